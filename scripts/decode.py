#!/usr/bin/env python3
"""Decode token shards (written by scripts/encode.py, in either format) back to PNG images with a VQ-HiT tokenizer.

    python scripts/decode.py --model runs/vqhit-demo/model --tokens tokens/images --output-dir decoded/
    accelerate launch --num_processes 8 scripts/decode.py --model runs/vqhit/model --tokens tokens/val \\
        --output-dir decoded/val --name-by id

Process r decodes the shards k = r (mod #processes). Images are the decoder's output clamped to [-1, 1]
and rounded to uint8. The tokenizer must be the one whose encoder and codebook made the tokens (checked by
fingerprint; a decoder fine-tuned later on the same codes passes); --allow-other-tokenizer overrides that.
Nothing is overwritten: when any file it would write is already in --output-dir (an earlier decode's, or the
source images themselves), it stops before decoding; decode into a new folder, or pass --overwrite.
"""
import argparse

from vqhit import cli
from vqhit.distributed import process_state
from vqhit.files import check_output_folder
from vqhit.models.vqhit import VQHiT
from vqhit.tokens import NAME_BY, decode_tokens


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_option(p, "The tokenizer whose decoder renders the tokens", "runs/vqhit-demo/model",
                         note=" (its codebook size and grid must match the tokens')")
    p.add_argument("--tokens", required=True, help="A folder written by scripts/encode.py: tokens.json and "
                   "safetensors shards, or a Parquet dataset (README.md and data/*.parquet)")
    p.add_argument("--output-dir", required=True, help="Folder for the PNG files")
    p.add_argument("--name-by", default="index", choices=NAME_BY, help="File names: 'index' = the image's "
                   "position in the source dataset (00000042.png), 'id' = the source file's relative path with a "
                   ".png suffix (a.jpg beside a.png becomes a.jpg.png: no image overwrites another) "
                   "(default: %(default)s)")
    p.add_argument("--allow-other-tokenizer", action="store_true", help="Decode even though --model's encoder or "
                   "codebook differs from the one that made the tokens (only for a decoder trained on these codes; "
                   "otherwise the images are meaningless)")
    p.add_argument("--overwrite", action="store_true", help="Replace files of --output-dir that have the names of "
                   "decoded images (by default any such file stops the script before it decodes anything, a re-run's "
                   "as much as the user's own images)")
    cli.add_run_options(p, batch_size=32, batch_of="token grids", workers=False)
    return p.parse_args(argv)


def main(argv=None):
    args = cli.with_launcher_settings(parse_args(argv), "decode.py")
    check_output_folder(args.output_dir)
    model = cli.load_model(VQHiT, args)
    written = decode_tokens(model, args.tokens, args.output_dir, batch_size=args.batch_size, name_by=args.name_by,
                            allow_other_tokenizer=args.allow_other_tokenizer, overwrite=args.overwrite,
                            progress=not args.no_progress)
    state = process_state()
    if state.is_main_process:
        print(f"{args.output_dir}: {written} images from the main process ({state.num_processes} processes)")
    return written


if __name__ == "__main__":
    cli.run(main)
