#!/usr/bin/env python3
"""Train a HiT generator as an unconditional GAN (SPEC §4-5).

    accelerate launch scripts/train_gan.py                                   # CPU demo: hit-tiny on built-in photos
    accelerate launch scripts/train_gan.py --config configs/ffhq256_gan.yaml --data /data/ffhq
    accelerate launch --multi_gpu --num_processes 8 scripts/train_gan.py --config configs/imagenet128_gan.yaml

Every option below can also be set in the --config YAML file; the command line wins.
"""
import sys

from vqhit.train_config import parse_config
from vqhit.training import train

DEFAULTS = dict(model="hit-tiny", output_dir="runs/gan-demo", steps=300, batch_size=16, lr=2e-4, disc_max_channels=64, ema_decay=0.99, r1_weight=1.0,
                sample_every=50, checkpoint_every=100)

if __name__ == "__main__":
    train(parse_config(sys.argv[1:], __doc__, DEFAULTS), task="gan")
