"""spkr: speaker recognition with streaming WebDataset shards and Mamba models."""

from spkr import runtime

runtime.configure()  # before anything imports torch: PyTorch reads its allocator setting once

__version__ = "0.1.0"
