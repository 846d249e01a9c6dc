#!/usr/bin/env python3
"""Train a HiT generator as an unconditional GAN (SPEC §1, §3-5).

    accelerate launch scripts/train_gan.py                              # CPU demo: hit-tiny on built-in photos
    accelerate launch scripts/train_gan.py --model hit-b-256 --data /data/ffhq256     # the paper recipe of hit-b-256
    accelerate launch --multi_gpu --num_processes 8 scripts/train_gan.py --config configs/ffhq256_gan.yaml

With no arguments at all this runs the CPU demo (configs/demo_gan_cpu.yaml). Any other invocation starts from the
paper recipe of the chosen --model (default hit-b-256), then the --config file, then the options given here.
"""
import sys
from pathlib import Path

from vqhit import cli
from vqhit.train_config import parse_config
from vqhit.training import train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_gan_cpu.yaml"


def main(argv=None):
    return train(parse_config(sys.argv[1:] if argv is None else argv, __doc__, "gan", DEMO_CONFIG), task="gan")


if __name__ == "__main__":
    cli.run(main)
