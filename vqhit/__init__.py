"""vqhit: the HiT transformer generator and the VQ-HiT tokenizer in PyTorch."""
from .models.discriminator import Discriminator
from .models.hit import HiTConfig, HiTGenerator
from .models.vqhit import VQHiT, VQHiTConfig
from .presets import list_presets

__version__ = "0.1.0"
__all__ = ["Discriminator", "HiTConfig", "HiTGenerator", "VQHiT", "VQHiTConfig", "list_presets"]
