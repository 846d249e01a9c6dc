"""The VQGAN convolutional encoder (Esser et al.), imported from `taming-transformers`.

Only `taming.modules.diffusionmodules.model` is imported: the rest of that package wants Lightning and
network downloads. The parameter names stay taming's, so a taming VQGAN checkpoint loads key for key.
"""
from __future__ import annotations

from taming.modules.diffusionmodules.model import Encoder as TamingEncoder


class VQGANEncoder(TamingEncoder):
    """Images (B, 3, R, R) -> features (B, z_channels, R/f, R/f) with f = 2^(len(channel_mult) - 1).

    With the VQGAN ImageNet f16 settings (the defaults) it has 29,298,176 parameters, as taming's.
    """

    def __init__(self, resolution: int = 256, channels: int = 128, channel_mult=(1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, attn_resolutions=(16,), z_channels: int = 256):
        super().__init__(ch=channels, out_ch=3, ch_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                         attn_resolutions=list(attn_resolutions), dropout=0.0, resamp_with_conv=True,
                         in_channels=3, resolution=resolution, z_channels=z_channels, double_z=False)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
