#!/usr/bin/env python3
"""Train a VQ-HiT tokenizer: VQGAN encoder, codebook, HiT decoder (SPEC §2, §4-5).

    accelerate launch scripts/train_vqhit.py                                 # CPU demo: vqhit-tiny on built-in photos
    accelerate launch scripts/train_vqhit.py --config configs/imagenet256_vqhit.yaml --data /data/imagenet
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vqhit.py --config configs/imagenet256_vqhit.yaml

The built-in default needs no network: it uses no pretrained VGG (perceptual loss off); the recipe configs use
LPIPS-VGG, downloaded when online or read from --vgg-weights. Every option below can also be set in the --config
YAML file; the command line wins.
"""
import sys
from pathlib import Path

from vqhit.train_config import parse_config
from vqhit.training import train

# With no --config, the CPU demo: demo_vqhit_cpu.yaml.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_vqhit_cpu.yaml"

if __name__ == "__main__":
    train(parse_config(sys.argv[1:], __doc__, DEMO_CONFIG), task="vqhit")
