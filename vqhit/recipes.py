"""The training recipe of every preset, as plain data: overrides of the `TrainConfig` defaults.

A run starts from the recipe of its `--model`, so a flag changes one setting of that recipe and nothing else:
`train_vqhit.py --steps 1500` is the demo with more steps, `train_vqhit.py --model vqhit-b-f16-1024` the paper's.

- Paper presets: the paper's recipes (HiT, its official release, and the VQ-HiT appendix). The `TrainConfig`
  defaults are the settings those recipes share (Adam betas (0, 0.99), R1 weight 10, EMA 0.999 from step 10, ...).
- Tiny presets: CPU demos on the built-in photographs, a few minutes on 2 cores, needing no download. The
  default model of each training script is its demo's (`DEFAULT_MODEL`).
"""
from __future__ import annotations

DEFAULT_MODEL = {"gan": "hit-tiny", "vqhit": "vqhit-demo"}

_FACES_256 = dict(transform="resize", lr=5e-5, disc_channel_multiplier=2, bcr_weight=10.0, steps=500_000)
_IMAGENET_128 = dict(transform="imagenet_gan", lr=1e-4, disc_channel_multiplier=1, steps=1_000_000)
_IMAGENET_256_TOKENIZER = dict(transform="random_crop", lr=1e-4, disc_channel_multiplier=1, perceptual="vgg_l2",
                               adv_weight=0.1, steps=500_000)

# hit-tiny (32x32) on the built-in photos: ~4 min on 2 CPU cores. What 300 steps of a GAN can do is blurry
# patches in the photos' colours: a check that everything runs, not a result.
_GAN_DEMO = dict(
    data="builtin:photos",
    batch_size=16,
    steps=300,
    lr=2e-4,
    r1_weight=1.0,
    r1_interval=4,         # lazy R1 (weight x 4 every 4th step): its double backward is 4x a D step on a CPU
    disc_max_channels=64,  # keeps the tiny discriminator at 0.4M parameters (the paper's table: 21.5M at 32x32)
    ema_decay=0.95,        # short run: average over ~20 steps
    ema_start=100,         # until then the EMA copies the model: averaged BatchNorm variances would otherwise still
                           # carry their initial 1.0 against a true ~5e-4, and eval-mode images come out flat grey
    sample_every=50,
    checkpoint_every=100,
    log_every=10,
    num_workers=2,
)

# A tokenizer that reconstructs photographs it never trained on, in minutes on 2 CPU cores: trained on
# builtin:photos (201 tiles of 5 photos), judged on other photographs, whole, at the end. More steps of this plain
# recipe beat whole photographs at several scales, more (grey) photographs, colour augmentation, other learning rates
# and schedules and other codebooks here (benchmarks/README.md).
_TOKENIZER_DEMO = dict(
    data="builtin:photos",
    heldout_data="builtin:photos-heldout",  # 12 whole-photograph thumbnails of 4 other colour photographs
    batch_size=8,          # batch 4 for twice the steps: 16.1 dB against 18.6 (BatchNorm on 4 images)
    steps=1100,            # 20.2 dB held out in 9 min 47 s on 2 Xeon cores (19.1 at 500, 19.9 at 1000, 20.3 at 1200)
    cpu_threads=-1,        # every core: ~0.5 s a step on 2 quiet Xeon cores, 0.6 s on one (accelerate launch starts one)
    num_workers=0,         # 8 small PNGs a step decode in milliseconds; worker processes only take CPU
    lr=5e-4,               # 18.1 dB held out at step 100, against 17.2 with 1e-3
    adam_betas=[0.9, 0.99],  # an autoencoder trained on L2 alone, not a GAN: Adam's usual momentum
    perceptual="none",     # LPIPS and the VGG loss need pretrained VGG weights (a download)
    adv_weight=0.0,        # no adversarial term: it trades PSNR for sharpness and adds a D step a step
    disc_max_channels=64,
    ema_decay=0.98,        # short run: average over the last ~50 steps
    ema_start=200,         # until then the EMA copies the model (see the GAN demo)
    sample_every=100,
    checkpoint_every=100,
)

RECIPES = {
    "hit-l-128": _IMAGENET_128,
    "hit-128-release": _IMAGENET_128,
    "hit-s-256": _FACES_256,
    "hit-b-256": _FACES_256,
    "hit-l-256": _FACES_256,
    "hit-b-1024": dict(transform="resize", lr=5e-5, disc_channel_multiplier=2, bcr_weight=0.0, batch_size=4,
                       steps=500_000),
    "vqhit-b-f16-1024": _IMAGENET_256_TOKENIZER,
    "vqgan-f16-1024": _IMAGENET_256_TOKENIZER,  # the paper's baseline under the same recipe
    "hit-tiny": _GAN_DEMO,
    "vqhit-demo": _TOKENIZER_DEMO,
    "vqhit-tiny": _TOKENIZER_DEMO,
    "vqgan-tiny": _TOKENIZER_DEMO,
    "vqvit-tiny": _TOKENIZER_DEMO,
}


def recipe_kind(model: str) -> str:
    """'the CPU demo recipe' or 'the paper recipe': what a run of `model` starts from."""
    return "the CPU demo recipe" if RECIPES.get(model) in (_GAN_DEMO, _TOKENIZER_DEMO) else "the paper recipe"
