#!/usr/bin/env python3
"""Encode a dataset into token shards with a trained VQ-HiT tokenizer (safetensors, resumable, multi-GPU).

    python scripts/encode.py --model runs/vqhit-demo/model --data /data/images --output-dir tokens/images
    accelerate launch --num_processes 8 scripts/encode.py --model runs/vqhit/model --data imagenet-1k \\
        --split train --output-dir tokens/imagenet-train --batch-size 128 --num-workers 8

Shard k holds dataset positions [k * shard_size, (k + 1) * shard_size); process r encodes the shards
k = r (mod #processes), so every image is encoded exactly once. Shards are written to a temporary name and
renamed: run the same command again after an interruption and only the missing shards are encoded.
Read the result back with vqhit.tokens.TokenDataset(output_dir) or scripts/decode.py.
"""
import argparse

from vqhit import cli
from vqhit.evaluation import DETERMINISTIC_TRANSFORMS, eval_dataset, process_state
from vqhit.models.vqhit import VQHiT
from vqhit.precision import PRECISIONS
from vqhit.tokens import encode_dataset


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="The tokenizer: a save_pretrained folder (e.g. the EMA export "
                   "runs/vqhit-demo/model) or a Hugging Face Hub repository id")
    p.add_argument("--data", required=True, help="Images to encode: a local image folder (sub-folders become "
                   "labels), a Hub dataset id, or 'builtin:photos'")
    p.add_argument("--output-dir", required=True, help="Folder for tokens.json and the shard-NNNNN.safetensors "
                   "files; an existing folder from the same model and data is resumed")
    p.add_argument("--split", default="train", help="Dataset split (default: %(default)s)")
    p.add_argument("--image-column", default="image", help="Image column of a Hub dataset (default: %(default)s)")
    p.add_argument("--label-column", default="auto", help="Label column to store with the tokens; 'auto' keeps a "
                   "column named 'label' when there is one, 'none' stores no labels (default: %(default)s)")
    p.add_argument("--transform", default="center_crop", choices=DETERMINISTIC_TRANSFORMS,
                   help="Deterministic preprocessing to the model's resolution, never flipped: center_crop "
                   "(short side, bicubic), adm_center_crop (ADM's evaluation crop), imagenet_gan_eval, or resize "
                   "(whole image) (default: %(default)s)")
    p.add_argument("--max-images", type=cli.int_at_least(1), default=None, help="Encode only the first N images "
                   "(quick runs)")
    p.add_argument("--bad-images", default="skip", choices=["skip", "raise"], help="Unreadable or too-small "
                   "images: skip them (their positions are listed in each shard's 'skipped') or stop (default: "
                   "%(default)s)")
    p.add_argument("--min-size", type=cli.int_at_least(0), default=0, help="Treat images whose short side is below N "
                   "pixels as bad images (see --bad-images); 0 keeps every image, upsampling those smaller than the "
                   "resolution (default: %(default)s)")
    p.add_argument("--shard-size", type=cli.int_at_least(1), default=1000, help="Images per shard: the unit of "
                   "resumption and of work split across processes (default: %(default)s)")
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=64, help="Images per forward pass per process "
                   "(default: %(default)s)")
    p.add_argument("--num-workers", type=cli.int_at_least(0), default=cli.default_num_workers(), help="DataLoader "
                   "worker processes per process (default: %(default)s here: up to 4, one fewer than the cores)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp32, or bf16 autocast (faster on "
                   "GPUs; a few indices may differ from fp32) (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.naming("--model", args.model):
        model = VQHiT.from_pretrained(args.model)
    label_column = None if args.label_column.lower() == "none" else args.label_column
    dataset = eval_dataset(args.data, model.config.resolution, transform=args.transform, split=args.split,
                           image_column=args.image_column, label_column=label_column, max_images=args.max_images,
                           bad_images=args.bad_images, min_size=args.min_size)
    summary = encode_dataset(model, dataset, args.output_dir, shard_size=args.shard_size, batch_size=args.batch_size,
                             num_workers=args.num_workers, model_id=args.model, precision=args.precision,
                             progress=not args.no_progress)
    if process_state().is_main_process:
        print(f"{summary.output_dir}: {summary.num_images} images in {summary.num_shards} shards "
              f"({summary.num_skipped} unreadable images skipped); this process encoded {len(summary.encoded)} "
              f"shards and found {len(summary.reused)} already complete")
    return summary


if __name__ == "__main__":
    cli.run(main)
