#!/usr/bin/env python3
"""Build mamba-ssm's selective-scan CUDA extension offline, for this machine's GPU only.

    python tools/build_mamba_ssm.py mamba_ssm-2.3.2.post1.tar.gz --out /opt/mamba_ssm
    export PYTHONPATH=/opt/mamba_ssm:$PYTHONPATH        # then backend "mamba_ssm" / "auto" finds it

``pip install mamba-ssm`` compiles the kernels for seven or more GPU architectures from source (there
are no wheels on the package index): that takes long and fails easily. This builds the one extension
spkr calls (``selective_scan_cuda``, from the sdist's csrc/selective_scan) with the sdist's own nvcc
flags but only the local GPU's architecture, through torch.utils.cpp_extension (ninja, ``MAX_JOBS``
parallel), and puts it beside the sdist's pure-Python package (its Triton kernels, Mamba-2's SSD
among them, need no build) in ``--out``. Needs nvcc and torch's CUDA build; no network.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from pathlib import Path

NVCC_FLAGS = [  # the sdist's setup.py flags, less its list of architectures
    "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo", "--threads", "4",
]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sdist", help="mamba_ssm-*.tar.gz (pip download --no-binary :all: --no-deps mamba-ssm)")
    p.add_argument("--out", required=True, help="folder for mamba_ssm/ and selective_scan_cuda*.so")
    args = p.parse_args()
    import torch
    from torch.utils.cpp_extension import load

    if not torch.cuda.is_available():
        print("build_mamba_ssm: no CUDA device here", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.sdist) as tar:
        tar.extractall(out / "src", filter="data")
    src = next((out / "src").glob("mamba_ssm-*"))
    (out / "mamba_ssm").exists() or (out / "mamba_ssm").symlink_to(src / "mamba_ssm")
    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    csrc = src / "csrc" / "selective_scan"
    sources = [csrc / "selective_scan.cpp", *sorted(csrc.glob("selective_scan_*.cu"))]
    t0 = time.time()
    load(
        name="selective_scan_cuda",
        sources=[str(s) for s in sources],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[*NVCC_FLAGS, arch],
        build_directory=str(out),
        verbose=True,
    )
    print(
        f"build_mamba_ssm: built selective_scan_cuda for sm_{major}{minor} in {time.time() - t0:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
