"""Process-level memory settings, applied when ``spkr`` is imported (before torch, in spkr's entry points).

The problem: glibc serves every large allocation (padded batches, activations: tens of MB) with a fresh
``mmap`` and unmaps it on free, so a step that allocates the same large tensors again and again touches
fresh 4 kB pages every time. Measured here: ~300k minor page faults per fwd+bwd of one Mamba-1 layer at
T=4096 (batch 8, d_model 128), which made the cost grow 4.8x from T=1024 to T=4096 for 4x the work, and
the zero-copy loader's collate spent most of its time faulting in its output batch.

``THP_MEM_ALLOC_ENABLE=1`` asks PyTorch's CPU allocator to align allocations of 2 MB and more to 2 MB and
``madvise(MADV_HUGEPAGE)`` them: with the kernel's transparent huge pages in ``madvise`` mode (the
common default, and this machine's), one fault maps 2 MB instead of 4 kB (~15x fewer faults measured).
PyTorch reads the variable once, at its first allocation, so it must be set before ``import torch``:
``spkr/__init__.py`` calls :func:`configure` first thing, which sets it as a *default* (a value the
user exported wins) and only if torch is not imported yet. ``SPKR_HUGEPAGES=0`` turns it off.
``tools/bench_*.py`` report which setting they ran with (:func:`describe`).
"""

from __future__ import annotations

import os
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def configure() -> None:
    """Default PyTorch's huge-page allocation on for this process and its children (see above)."""
    if os.environ.get("SPKR_HUGEPAGES", "1") != "0" and "torch" not in sys.modules:
        os.environ.setdefault(THP_ENV, "1")


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never' or 'unknown')."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def describe() -> str:
    """One line for logs and benchmarks: is huge-page allocation in effect for torch tensors?"""
    return f"{THP_ENV}={os.environ.get(THP_ENV, '(unset)')} (kernel THP mode {thp_mode()})"
