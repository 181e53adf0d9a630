"""LibriSpeech corpus access: subset names, OpenSLR/Hugging Face sources, labels, re-splits and the
evaluation protocols (closed, closed-session, open: :mod:`spkr.corpus.protocols`).

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
from .protocols import Protocol, ProtocolSplit, make_protocol

__all__ = [
    "COMBINED",
    "DEV_SUBSET",
    "SUBSETS",
    "TEST_SUBSET",
    "TRAIN_SUBSETS",
    "Protocol",
    "ProtocolSplit",
    "SpeakerInfo",
    "Splits",
    "Utterance",
    "build_splits",
    "class_set",
    "class_weights",
    "expand_subsets",
    "iter_hf_dataset",
    "iter_openslr",
    "make_protocol",
    "read_speakers_txt",
    "sort_speakers",
    "training_combination",
    "verify_splits",
]
