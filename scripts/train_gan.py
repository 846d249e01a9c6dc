#!/usr/bin/env python3
"""Train a HiT generator as an unconditional GAN.

    accelerate launch scripts/train_gan.py                      # the CPU demo: hit-tiny on built-in photos
    accelerate launch scripts/train_gan.py --steps 600          # the demo, with one setting changed
    accelerate launch scripts/train_gan.py --model hit-b-256 --data /data/ffhq256   # the paper recipe of hit-b-256
    accelerate launch --multi_gpu --num_processes 8 scripts/train_gan.py --config configs/ffhq256_gan.yaml \\
        --output-dir runs/ffhq256 --resume auto                 # one command for the first start and every restart

Every option starts from the recipe of the chosen --model: the CPU demo's for the default hit-tiny, the paper's for
the paper presets; then the --config file, then the options given here.
"""
import os
import sys

# Idle OpenMP threads sleep instead of spinning (read when torch loads, so set here): on a CPU shared with other
# processes, threads spinning at every operation's barrier can make a step several times slower (--cpu-threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vqhit import cli  # noqa: E402
from vqhit.train_config import parse_config  # noqa: E402
from vqhit.training import train  # noqa: E402


def main(argv=None):
    return train(parse_config(sys.argv[1:] if argv is None else argv, __doc__, "gan"), task="gan")


if __name__ == "__main__":
    cli.run(main)
