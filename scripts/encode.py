#!/usr/bin/env python3
"""Encode a dataset into token shards with a trained VQ-HiT tokenizer (safetensors, resumable, multi-GPU).

    python scripts/encode.py --model runs/vqhit-demo/model --data /data/images --output-dir tokens/images
    accelerate launch --num_processes 8 scripts/encode.py --model runs/vqhit/model --data imagenet-1k \\
        --split train --output-dir tokens/imagenet-train --batch-size 128 --num-workers 8

Shard k holds dataset positions [k * shard_size, (k + 1) * shard_size); process r encodes the shards
k = r (mod #processes), so every image is encoded exactly once. Shards are written to a temporary name and
renamed: run the same command again after an interruption and only the missing shards are encoded.
Images skipped as bad (--bad-images skip) are listed by position in each shard's 'skipped'.
Read the result back with vqhit.tokens.TokenDataset(output_dir) or scripts/decode.py.
"""
import argparse

from vqhit import cli
from vqhit.distributed import process_state
from vqhit.files import check_output_folder
from vqhit.models.vqhit import VQHiT
from vqhit.tokens import encode_dataset


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_option(p, "The tokenizer", "runs/vqhit-demo/model")
    cli.add_dataset_options(p, "Images to encode", transform="center_crop")
    p.add_argument("--output-dir", required=True, help="Folder for tokens.json and the shard-NNNNN.safetensors "
                   "files; an existing folder from the same model and data is resumed")
    p.add_argument("--label-column", default="auto", help="Label column to store with the tokens; 'auto' keeps a "
                   "column named 'label' when there is one, 'none' stores no labels (default: %(default)s)")
    p.add_argument("--max-images", type=cli.int_at_least(1), default=None, help="Encode only the first N images "
                   "(quick runs)")
    p.add_argument("--shard-size", type=cli.int_at_least(1), default=1000, help="Images per shard: the unit of "
                   "resumption and of work split across processes (default: %(default)s)")
    cli.add_run_options(p, batch_size=64, batch_of="images", precision_note="for the encoder (faster on GPUs; a "
                        "few indices may differ from fp32's)")
    return p.parse_args(argv)


def main(argv=None):
    args = cli.with_launcher_settings(parse_args(argv), "encode.py")
    check_output_folder(args.output_dir)
    model = cli.load_model(VQHiT, args)
    label_column = None if args.label_column.lower() == "none" else args.label_column
    dataset = cli.eval_dataset_from_args(args, model.config.resolution, max_images=args.max_images,
                                         label_column=label_column)
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
