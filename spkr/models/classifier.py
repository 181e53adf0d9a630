"""TacoMamba speaker classifier and the Transformer baseline (same front-end, pooling and heads).

    mel (B, T, F), lengths (B,)
      -> [input_norm "utterance": minus each utterance's mean per mel bin over its valid frames]
      -> ConvFrontend: masked Conv1d stack (kernel k, optional stride-2 subsampling), per-frame LayerNorm,
         GELU, Linear -> d_model                                     (B, T', d_model), lengths'
      -> encoder: n_layers x [x + Dropout(Mixer(RMSNorm(x)))] (Mamba-1 / Mamba-2, optionally bidirectional)
         or nn.TransformerEncoder with a key padding mask and sinusoidal positions
      -> RMSNorm -> masked pooling over time ("mean" | "attentive_stats")
      -> Linear -> embedding (B, E) -> head ("softmax" | "aam")      logits (B, n_classes)

Padding invariance: every op that mixes frames is masked -- padded frames are zeroed before each
front-end conv (so they look exactly like the conv's own zero padding) and after each encoder layer,
the Mamba scan is causal, the backward direction reverses each utterance within its own length, and
pooling ignores padded frames. So valid-frame outputs and pooled outputs do not depend on how much an
utterance is padded in its batch (up to float rounding).

Subsampling: each stride-2 conv (kernel k, padding k//2) maps a length ``n`` to ``(n - 1) // 2 + 1``
(= ceil(n / 2)); :meth:`SpeakerClassifier.output_lengths` gives the encoder lengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from spkr.models.config import ModelConfig
from spkr.models.mamba import Mamba1, Mamba2, RMSNorm, check_backend, resolve_backend


def length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True at valid frames."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def reverse_index(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) gather index reversing frames [0, len) of each row and leaving padded frames in place.
    It is its own inverse."""
    t = torch.arange(T, device=lengths.device)[None, :]
    return torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)


def utterance_mean_norm(mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """mel (B, T, F) minus each utterance's mean over its valid frames, per mel bin (cepstral mean
    normalisation in the log-mel domain: a fixed channel EQ is a per-bin offset there); padded frames
    are zero on return, so the result does not depend on the padding."""
    mask = length_mask(lengths, mel.shape[1]).unsqueeze(-1).to(mel.dtype)
    mean = (mel * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return (mel - mean) * mask


class ConvFrontend(nn.Module):
    """Masked Conv1d stack over mel frames; the first log2(subsample) convs have stride 2."""

    def __init__(self, n_mels: int, channels: list[int], kernel: int, subsample: int, d_model: int):
        super().__init__()
        n_stride = {1: 0, 2: 1, 4: 2}[subsample]
        self.kernel = kernel
        self.strides = [2 if i < n_stride else 1 for i in range(len(channels))]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = n_mels
        for c_out, s in zip(channels, self.strides):
            self.convs.append(nn.Conv1d(c_in, c_out, kernel, stride=s, padding=kernel // 2))
            self.norms.append(nn.LayerNorm(c_out))  # per frame: no mixing across time or batch
            c_in = c_out
        self.proj = nn.Linear(c_in, d_model)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for s in self.strides:
            if s == 2:
                lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        return lengths

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, T, F), lengths (B,) -> (B, T', d_model) with padded frames zero, lengths' (B,)."""
        x = mel
        for conv, norm, s in zip(self.convs, self.norms, self.strides):
            x = x * length_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)
            x = conv(x.transpose(1, 2)).transpose(1, 2)
            if s == 2:
                lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            x = F.gelu(norm(x))
        x = self.proj(x)
        return x * length_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype), lengths


def reverse_rows(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B * T,) row index into a (B * T, C) view of (B, T, C) frames doing what :func:`reverse_index`
    does (reverse frames [0, len) of each utterance, padded frames in place); its own inverse."""
    starts = T * torch.arange(len(lengths), device=lengths.device)  # (B,) first row of each utterance
    return (reverse_index(lengths, T) + starts[:, None]).view(-1)


class _PermuteFrames(torch.autograd.Function):
    """x (B, T, C) -> its B * T frames reordered by ``rows`` (a permutation that is its own inverse,
    from :func:`reverse_rows`): whole rows copied by index_select, forward and backward. The gradient
    is the same permutation of the incoming gradient (what a gather's scatter-add backward computes,
    at a fraction of the cost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return x.reshape(rows.numel(), -1).index_select(0, rows).view(x.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return g.reshape(rows.numel(), -1).index_select(0, rows).view(g.shape), None


def _reverse(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) reversed within each utterance's length (rows from :func:`reverse_rows`)."""
    return _PermuteFrames.apply(x, rows)


class MambaLayer(nn.Module):
    """Pre-norm residual Mamba layer; bidirectional = forward mixer + within-length-reversed mixer, summed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model)
        self.fwd = self._mixer(cfg)
        self.bwd = self._mixer(cfg) if cfg.bidirectional else None
        self.drop = nn.Dropout(cfg.dropout)

    @staticmethod
    def _mixer(cfg: ModelConfig) -> nn.Module:
        common = dict(
            d_conv=cfg.d_conv, expand=cfg.expand, chunk_size=cfg.resolved_chunk_size, backend=cfg.backend
        )
        if cfg.arch == "mamba":
            return Mamba1(cfg.d_model, cfg.d_state, dt_rank=cfg.resolved_dt_rank, **common)
        return Mamba2(cfg.d_model, cfg.d_state, headdim=cfg.headdim, **common)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rev: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d_model), mask (B, T), rev: (B * T,) from :func:`reverse_rows` (bidirectional)."""
        h = self.norm(x)
        y = self.fwd(h)
        if self.bwd is not None:
            y = y + _reverse(self.bwd(_reverse(h, rev)), rev)
        x = x + self.drop(y)
        return x * mask.unsqueeze(-1).to(x.dtype)


class MambaEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bidirectional = cfg.bidirectional
        self.layers = nn.ModuleList(MambaLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        mask = length_mask(lengths, T)
        rev = reverse_rows(lengths, T) if self.bidirectional else None
        for layer in self.layers:
            x = layer(x, mask, rev)
        return x


def sinusoidal_positions(T: int, dim: int, device: torch.device) -> torch.Tensor:
    """(T, dim) fixed sinusoidal position encodings."""
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(T, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


class TransformerBaseline(nn.Module):
    """nn.TransformerEncoder (pre-norm, GELU) with a key padding mask and sinusoidal positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.n_heads,
            cfg.ff_mult * cfg.d_model,
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        mask = length_mask(lengths, T)
        x = x + sinusoidal_positions(T, x.shape[-1], x.device).to(x.dtype)
        x = self.encoder(x, src_key_padding_mask=~mask)
        return x * mask.unsqueeze(-1).to(x.dtype)


class MeanPool(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.out_dim = channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(torch.float32)
        return (x.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


class AttentiveStatsPool(nn.Module):
    """Channel-wise attentive statistics: softmax over valid frames, weighted mean and std (B, 2C)."""

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.att = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Linear(hidden, channels))
        self.out_dim = 2 * channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.att(x).float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
        w = torch.softmax(logits, dim=1)  # (B, T, C); every row has >= 1 valid frame
        xf = x.float()
        mu = (w * xf).sum(1)
        var = (w * xf * xf).sum(1) - mu * mu
        return torch.cat([mu, torch.sqrt(var.clamp(min=1e-6))], dim=-1)


class AAMHead(nn.Module):
    """Additive angular margin (ArcFace) head: logits = s * cos(theta + m*[target]) in training with
    labels, s * cos(theta) otherwise; so |logits| <= s always."""

    def __init__(self, dim: int, n_classes: int, margin: float, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin, self.scale = margin, scale
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)  # beyond this, cos(theta+m) is not monotone: fall back
        self.mm = math.sin(math.pi - margin) * margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(emb.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
        if labels is None or not self.training or self.margin == 0.0:
            return self.scale * cos
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-7))
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > self.th, phi, cos - self.mm)
        onehot = F.one_hot(labels, cos.shape[-1]).to(torch.bool)
        return self.scale * torch.where(onehot, phi, cos)


class SpeakerClassifier(nn.Module):
    """model(mel (B,T,F), lengths (B,), labels=None) -> logits (B, n_classes); embed(...) -> (B, E)."""

    def __init__(self, cfg: ModelConfig, n_mels: int, n_classes: int):
        super().__init__()
        self.cfg = cfg
        self.frontend = ConvFrontend(
            n_mels, cfg.frontend_channels, cfg.frontend_kernel, cfg.subsample, cfg.d_model
        )
        if cfg.arch == "transformer":
            self.encoder: nn.Module = TransformerBaseline(cfg)
        else:
            check_backend(cfg.backend)
            self.encoder = MambaEncoder(cfg)
        self.norm = RMSNorm(cfg.d_model)
        self.pool = MeanPool(cfg.d_model) if cfg.pooling == "mean" else AttentiveStatsPool(cfg.d_model)
        self.embedding = nn.Linear(self.pool.out_dim, cfg.embedding_dim)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.head == "aam":
            self.head: nn.Module = AAMHead(cfg.embedding_dim, n_classes, cfg.aam_margin, cfg.aam_scale)
        else:
            self.head = nn.Linear(cfg.embedding_dim, n_classes)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: 2-D+ weights (projections, convs, heads) decayed with
        ``weight_decay``; norms, biases, Mamba's A_log / D / dt_bias not decayed (:func:`param_groups`)."""
        return param_groups(self, weight_decay)

    def backend_name(self) -> str:
        """ "transformer", or the SSM backend used for this model's device: "torch" | "triton" | "mamba_ssm"."""
        if self.cfg.arch == "transformer":
            return "transformer"
        return resolve_backend(self.cfg.backend, self.embedding.weight.device)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frame counts for input frame counts (subsampling: n -> (n - 1) // 2 + 1 per stride 2)."""
        return self.frontend.output_lengths(lengths)

    def encode(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> frame features (B, T', d_model) (padded frames zero) and lengths' (B,)."""
        lengths = lengths.to(device=mel.device, dtype=torch.long)
        if self.cfg.input_norm == "utterance":
            mel = utterance_mean_norm(mel, lengths)
        x, lengths = self.frontend(mel, lengths)
        x = self.encoder(x, lengths)
        return self.norm(x), lengths

    def embed(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x, lengths = self.encode(mel, lengths)
        pooled = self.pool(x, length_mask(lengths, x.shape[1]))
        return self.embedding(pooled)

    def forward(
        self, mel: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.drop(self.embed(mel, lengths))
        if isinstance(self.head, AAMHead):
            return self.head(emb, labels)
        return self.head(emb)


NO_DECAY_MODULES = (
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d, RMSNorm, nn.Embedding,
)  # fmt: skip
SSM_NO_DECAY = ("A_log", "D", "dt_bias")  # what Mamba1/Mamba2 mark with _no_weight_decay


def no_weight_decay(module: nn.Module) -> set[int]:
    """ids of the parameters of ``module`` that must not be weight-decayed: those marked
    ``p._no_weight_decay = True`` (Mamba's A_log, D, dt_bias), every parameter of a norm or an
    embedding (positional tables included), every bias and every other parameter with fewer than
    2 dims. The SSM parameters of Mamba1/Mamba2 are also recognised by name, because a
    ``copy.deepcopy`` of a model (EMA, SWA copies) drops the marker attributes."""
    ids = set()
    for m in module.modules():
        own = dict(m.named_parameters(recurse=False))
        for name, p in own.items():
            if (
                getattr(p, "_no_weight_decay", False)
                or isinstance(m, NO_DECAY_MODULES)
                or (isinstance(m, (Mamba1, Mamba2)) and name in SSM_NO_DECAY)
                or name.endswith("bias")
                or p.dim() < 2
            ):
                ids.add(id(p))
    return ids


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups of ``module``: [{"params": decayed, "weight_decay": weight_decay},
    {"params": the :func:`no_weight_decay` ones, "weight_decay": 0.0}] over the trainable parameters,
    each exactly once (shared parameters included once), in ``named_parameters`` order; empty groups
    are left out. Each group also carries torch's optional "param_names" (saved with the optimizer state)."""
    skip = no_weight_decay(module)
    decay: dict[str, list] = {"params": [], "param_names": []}
    keep: dict[str, list] = {"params": [], "param_names": []}
    for name, p in module.named_parameters():
        if p.requires_grad:
            group = keep if id(p) in skip else decay
            group["params"].append(p)
            group["param_names"].append(name)
    groups = [{**decay, "weight_decay": weight_decay}, {**keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_model(cfg: ModelConfig, n_mels: int, n_classes: int) -> SpeakerClassifier:
    """The classifier for ``cfg`` (raises BackendUnavailable for a backend that cannot be imported here)."""
    return SpeakerClassifier(cfg, n_mels, n_classes)
