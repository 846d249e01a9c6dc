#!/usr/bin/env python3
"""Encode a dataset into token shards with a trained VQ-HiT tokenizer (resumable, multi-GPU).

    python scripts/encode.py --model runs/vqhit-demo/model --data /data/images --output-dir tokens/images
    accelerate launch --num_processes 8 scripts/encode.py --model runs/vqhit/model --data imagenet-1k \\
        --split train --output-dir tokens/imagenet-train --batch-size 128 --num-workers 8
    python scripts/encode.py --model runs/vqhit-demo/model --data builtin:photos --output-dir tokens/photos \\
        --format parquet                  # a `datasets` dataset: datasets.load_dataset("tokens/photos")

Shard k holds dataset positions [k * shard_size, (k + 1) * shard_size); process r encodes the shards
k = r (mod #processes), so every image is encoded exactly once. Shards are written to a temporary name and
renamed: run the same command again after an interruption and only the missing shards are encoded.
Images skipped as bad (--bad-images skip) are listed by position in each shard's 'skipped'.
--format safetensors (the default) writes tokens.json and shard-NNNNN.safetensors; --format parquet writes a
Hugging Face dataset: a dataset card README.md that holds the manifest, and data/train-NNNNN-of-NNNNN.parquet with
one row per image. Read either back with vqhit.tokens.TokenDataset(output_dir) or scripts/decode.py; a Parquet
folder also with datasets.load_dataset(output_dir), and vqhit.tokens.push_tokens_to_hub uploads it.
"""
import argparse

from vqhit import cli
from vqhit.distributed import process_state
from vqhit.files import check_output_folder
from vqhit.models.vqhit import VQHiT
from vqhit.tokens import FORMATS, encode_dataset


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
    p.add_argument("--format", default=FORMATS[0], choices=FORMATS, help="safetensors: tokens.json and "
                   "shard-NNNNN.safetensors, read with vqhit; parquet: a Hugging Face dataset (README.md card and "
                   "data/*.parquet) that datasets.load_dataset reads without vqhit and the Hub shows. A folder is "
                   "resumed in the format it was started in (default: %(default)s)")
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
                             progress=not args.no_progress, file_format=args.format)
    if process_state().is_main_process:
        print(f"{summary.output_dir}: {summary.num_images} images in {summary.num_shards} {summary.file_format} shards "
              f"({summary.num_skipped} unreadable images skipped); this process encoded {len(summary.encoded)} "
              f"shards and found {len(summary.reused)} already complete")
    return summary


if __name__ == "__main__":
    cli.run(main)
