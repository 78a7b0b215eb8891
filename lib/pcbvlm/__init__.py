"""pcbvlm: fine-tune Qwen3-VL to find defects on printed circuit boards (DeepPCB)."""

__version__ = "0.1.0"
