"""LibriSpeech corpus access: subset names, OpenSLR/Hugging Face sources, labels and re-splits.

Downloading lives in :mod:`spkr.corpus.download` (imported on demand: it pulls in requests/rich).
"""

from .labels import Splits, build_splits, class_set, class_weights, sort_speakers, verify_splits
from .librispeech import (
    COMBINED,
    DEV_SUBSET,
    SUBSETS,
    TEST_SUBSET,
    TRAIN_SUBSETS,
    SpeakerInfo,
    Utterance,
    expand_subsets,
    iter_hf_dataset,
    iter_openslr,
    read_speakers_txt,
    training_combination,
)

__all__ = [
    "COMBINED",
    "DEV_SUBSET",
    "SUBSETS",
    "TEST_SUBSET",
    "TRAIN_SUBSETS",
    "SpeakerInfo",
    "Splits",
    "Utterance",
    "build_splits",
    "class_set",
    "class_weights",
    "expand_subsets",
    "iter_hf_dataset",
    "iter_openslr",
    "read_speakers_txt",
    "sort_speakers",
    "training_combination",
    "verify_splits",
]
