"""vqhit: the HiT transformer generator and the VQ-HiT tokenizer in PyTorch."""
from .models.hit import HiTConfig, HiTGenerator
from .presets import list_presets

__version__ = "0.1.0"
__all__ = ["HiTConfig", "HiTGenerator", "list_presets"]
