"""ModelConfig: the ``[model]`` table of a config file (see configs/*.toml; read by
:func:`spkr.run.configs.load_configs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from spkr.config import check_fields, in_range

ARCHS = ("mamba", "mamba2", "transformer")
BACKENDS = ("auto", "torch", "triton", "mamba_ssm")
POOLINGS = ("mean", "attentive_stats")
HEADS = ("softmax", "aam")
INPUT_NORMS = ("none", "utterance")


@dataclass
class ModelConfig:
    arch: str = "mamba"  # "mamba" (Mamba-1) | "mamba2" (SSD) | "transformer" (baseline)
    d_model: int = 128
    n_layers: int = 4
    # Mamba blocks
    d_state: int = 16  # n; Mamba-2 usually 64
    d_conv: int = 4  # causal depthwise conv width inside each block
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # Mamba-1 low-rank dt projection; 0 = ceil(d_model / 16)
    headdim: int = 32  # Mamba-2 head dim p (d_inner must be a multiple)
    chunk_size: int = 0  # scan chunk; 0 = auto (8 for mamba, 64 for mamba2)
    bidirectional: bool = True  # forward + within-length-reversed backward Mamba per layer, summed
    # Mamba scan kernel: "auto" | "torch" | "triton" | "mamba_ssm" (spkr.models.mamba says which is which;
    # "auto" = mamba_ssm, else triton, on CUDA; torch elsewhere). Weights are the same for every backend.
    backend: str = "auto"
    # input: "none" (the loader's global per-bin normalisation only) | "utterance" (also subtract each
    # utterance's mean log-mel per bin over its valid frames: cepstral mean normalisation, which removes a
    # fixed channel colouring -- microphone, room EQ -- the way Kaldi's x-vector recipe does with CMN)
    input_norm: str = "none"
    # front-end over mel frames
    frontend_channels: list[int] = field(default_factory=lambda: [128, 128])
    frontend_kernel: int = 5
    subsample: int = 1  # time subsampling 1 | 2 | 4 (stride-2 convs at the start of the front-end)
    # pooling / embedding / head
    pooling: str = "attentive_stats"  # "mean" | "attentive_stats"
    embedding_dim: int = 192
    head: str = "aam"  # "softmax" | "aam" (additive angular margin)
    aam_margin: float = 0.2
    aam_scale: float = 30.0
    dropout: float = 0.1
    # transformer baseline
    n_heads: int = 4
    ff_mult: int = 4

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("d_model", "d_state", "d_conv", "expand", "headdim", "frontend_kernel", "embedding_dim"):
            in_range(getattr(self, name), name, 1)
        for name in ("n_heads", "ff_mult"):
            in_range(getattr(self, name), name, 1)
        for name in ("n_layers", "dt_rank", "chunk_size"):
            in_range(getattr(self, name), name, 0)
        for i, channels in enumerate(self.frontend_channels):
            in_range(channels, f"frontend_channels[{i}]", 1)
        in_range(self.aam_scale, "aam_scale", above=0)
        in_range(self.aam_margin, "aam_margin", 0, 1)

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        need(
            self.input_norm in INPUT_NORMS,
            f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}",
        )
        need(self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}")
        need(self.subsample in (1, 2, 4), f"subsample must be 1, 2 or 4, got {self.subsample}")
        need(self.frontend_kernel % 2 == 1, f"frontend_kernel must be odd, got {self.frontend_kernel}")
        n_stride = {1: 0, 2: 1, 4: 2}[self.subsample]
        need(
            len(self.frontend_channels) >= n_stride,
            f"subsample={self.subsample} needs >= {n_stride} frontend_channels entries",
        )
        need(self.d_model > 0 and self.n_layers >= 0, "d_model must be > 0 and n_layers >= 0")
        need(self.chunk_size >= 0, "chunk_size must be >= 0")
        if self.arch == "mamba2":
            need(
                (self.expand * self.d_model) % self.headdim == 0,
                f"expand*d_model={self.expand * self.d_model} must be a multiple of headdim={self.headdim}",
            )
        if self.arch == "transformer":
            need(self.d_model % self.n_heads == 0, "d_model must be a multiple of n_heads")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")

    @property
    def resolved_chunk_size(self) -> int:
        if self.chunk_size:
            return self.chunk_size
        return 64 if self.arch == "mamba2" else 8

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or -(-self.d_model // 16)
