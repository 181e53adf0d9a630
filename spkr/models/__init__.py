"""Speaker models: Mamba-1/2 (pure torch or mamba_ssm kernels) and a Transformer baseline."""

from spkr.models.classifier import SpeakerClassifier, build_model
from spkr.models.config import ModelConfig
from spkr.models.mamba import BackendUnavailable, Mamba1, Mamba2, mamba_ssm_available, resolve_backend

__all__ = [
    "BackendUnavailable",
    "Mamba1",
    "Mamba2",
    "ModelConfig",
    "SpeakerClassifier",
    "build_model",
    "mamba_ssm_available",
    "resolve_backend",
]
