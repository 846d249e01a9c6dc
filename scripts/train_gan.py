#!/usr/bin/env python3
"""Train a HiT generator as an unconditional GAN (SPEC §4-5).

    accelerate launch scripts/train_gan.py                                   # CPU demo: hit-tiny on built-in photos
    accelerate launch scripts/train_gan.py --config configs/ffhq256_gan.yaml --data /data/ffhq
    accelerate launch --multi_gpu --num_processes 8 scripts/train_gan.py --config configs/imagenet128_gan.yaml

Every option below can also be set in the --config YAML file; the command line wins.
"""
import sys
from pathlib import Path

from vqhit.train_config import parse_config
from vqhit.training import train

# With no --config, the CPU demo: demo_gan_cpu.yaml.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_gan_cpu.yaml"

if __name__ == "__main__":
    train(parse_config(sys.argv[1:], __doc__, DEMO_CONFIG), task="gan")
