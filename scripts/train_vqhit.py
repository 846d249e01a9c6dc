#!/usr/bin/env python3
"""Train a VQ-HiT tokenizer: VQGAN encoder, codebook, HiT decoder.

    accelerate launch scripts/train_vqhit.py                    # the CPU demo: vqhit-demo on built-in photos
    accelerate launch scripts/train_vqhit.py --steps 1500       # the demo, with one setting changed
    accelerate launch scripts/train_vqhit.py --model vqhit-b-f16-1024 --data /data/imagenet   # the paper recipe
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vqhit.py --config configs/imagenet256_vqhit.yaml \\
        --output-dir runs/imagenet256 --resume auto             # one command for the first start and every restart

Every option starts from the recipe of the chosen --model: the CPU demo's for the default vqhit-demo (no network
needed), the paper's for vqhit-b-f16-1024 (raw-VGG perceptual loss, pretrained VGG downloaded when online or read
from --vgg-weights); then the --config file, then the options given here.
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
    return train(parse_config(sys.argv[1:] if argv is None else argv, __doc__, "vqhit"), task="vqhit")


if __name__ == "__main__":
    cli.run(main)
