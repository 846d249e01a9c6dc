#!/usr/bin/env python3
"""Train a VQ-HiT tokenizer: VQGAN encoder, codebook, HiT decoder (SPEC §2, §4-5).

    accelerate launch scripts/train_vqhit.py                                 # CPU demo on built-in photos
    accelerate launch scripts/train_vqhit.py --data /data/imagenet           # the paper recipe (vqhit-b-f16-1024)
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vqhit.py --config configs/imagenet256_vqhit.yaml

With no arguments at all this runs the CPU demo (configs/demo_vqhit_cpu.yaml), which needs no network. Any other
invocation starts from the paper recipe of the chosen --model (default vqhit-b-f16-1024: raw-VGG perceptual loss,
pretrained VGG downloaded when online or read from --vgg-weights), then the --config file, then these options.
"""
import sys
from pathlib import Path

from vqhit import cli
from vqhit.train_config import parse_config
from vqhit.training import train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_vqhit_cpu.yaml"


def main(argv=None):
    return train(parse_config(sys.argv[1:] if argv is None else argv, __doc__, "vqhit", DEMO_CONFIG), task="vqhit")


if __name__ == "__main__":
    cli.run(main)
