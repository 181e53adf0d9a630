"""spkr: speaker recognition with streaming WebDataset shards and Mamba models."""

__version__ = "0.1.0"
