"""Process-level memory setting: huge pages for PyTorch's large CPU tensors, opt-in (``SPKR_HUGEPAGES=1``).

glibc serves large allocations (padded batches, activations: tens of MB) with fresh ``mmap``s, so a step
that allocates big tensors again and again can touch fresh 4 kB pages every time, one minor page fault
each. ``THP_MEM_ALLOC_ENABLE=1`` asks PyTorch's CPU allocator to align allocations of 2 MB and more to
2 MB and ``madvise(MADV_HUGEPAGE)`` them: with the kernel's transparent huge pages in ``madvise`` mode
(the common default), one fault maps 2 MB instead of 4 kB. What it changes (the loader, the Mamba
layers, mambapy's parallel scan, which materialises (B, T, D, N) tensors) is in README, Benchmarks.

Because it changes allocation for the whole process, spkr does not turn it on by itself: ``SPKR_HUGEPAGES=1`` makes ``import spkr`` (which runs
:func:`configure` before anything imports torch) set ``THP_MEM_ALLOC_ENABLE=1`` as a default; exporting
``THP_MEM_ALLOC_ENABLE=1`` yourself works too. PyTorch reads the variable once, at its first allocation,
so it must be set before torch is imported. ``tools/bench_*.py`` print the setting they ran with (:func:`describe`).

:func:`configure` also drops one spurious warning of CPU runs (:func:`quiet_cuda_home_warning`).
:func:`env_rank_world` is spkr's one reader of torchrun's ``RANK`` / ``WORLD_SIZE``.
"""

from __future__ import annotations

import logging
import os
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def configure() -> None:
    """Process-level settings, run by ``import spkr``: with ``SPKR_HUGEPAGES=1``, PyTorch's huge-page
    allocation for this process and its children; always :func:`quiet_cuda_home_warning`."""
    if os.environ.get("SPKR_HUGEPAGES") == "1" and "torch" not in sys.modules:
        os.environ.setdefault(THP_ENV, "1")
    quiet_cuda_home_warning()


CUDA_HOME_WARNING = "No CUDA runtime is found, using CUDA_HOME="


class _NoCudaHomeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(CUDA_HOME_WARNING))


def quiet_cuda_home_warning() -> None:
    """Drop exactly torch's "No CUDA runtime is found, using CUDA_HOME=..." log line (nothing else).

    On a machine without a GPU but with a CUDA toolkit in sight (``nvcc`` on PATH, ``/usr/local/cuda``
    or ``CUDA_HOME``) and a CUDA build of torch, ``torch.utils.cpp_extension`` logs it when imported,
    which torch.compile's CPU backend does to find torch's C++ headers (inductor's
    ``cpp_builder._get_torch_related_args``): every compiled CPU run printed it once per rank. spkr
    builds no CUDA extension, so the line says nothing about the run; it cannot be avoided at the
    source (inductor needs that module for CPU code), so a filter on that module's logger drops the
    one message. Installed without importing torch; idempotent."""
    log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaHomeWarning) for f in log.filters):
        log.addFilter(_NoCudaHomeWarning())


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


def env_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment (``RANK``, ``WORLD_SIZE``), else (0, 1). Once a
    process group is up, :func:`spkr.stream.loader.default_rank_world` asks torch.distributed instead."""
    out = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1)):
        value = os.environ.get(name)
        try:
            out.append(default if value is None else int(value))
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return out[0], out[1]
