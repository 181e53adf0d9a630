"""spkr: speaker recognition with streaming WebDataset shards and Mamba models."""

from spkr import runtime

runtime.configure()  # SPKR_HUGEPAGES=1: before anything imports torch (PyTorch reads it once)

__version__ = "0.1.0"
