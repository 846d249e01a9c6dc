#!/usr/bin/env python3
"""Export a saved tokenizer or generator to ONNX graphs, for onnxruntime and other ONNX runtimes.

    python scripts/export.py --model runs/vqhit-demo/model --format onnx --output-dir exports/vqhit-demo
    python scripts/export.py --model runs/hit-tiny/model --output-dir exports/hit-tiny

A tokenizer gives encoder.onnx (images -> token indices) and decoder.onnx (token indices -> images), a generator
generator.onnx (latents -> images), each with a dynamic batch axis, and config.json beside them (the model's own:
resolution, grid, codebook size, latent width). docs/models.md says what each graph takes and returns.
The folder is written whole or not at all. A non-empty --output-dir is refused unless --overwrite, which replaces a
previous export there (a folder holding other files is refused even then). Needs the onnx extra:
pip install 'vqhit[onnx]'.
"""
import argparse

from vqhit import cli
from vqhit.export import FORMATS, check_export_folder, check_format, export_model, load_pretrained


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_option(p, "The tokenizer or generator to export", "runs/vqhit-demo/model")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="Export format (default: %(default)s)")
    p.add_argument("--output-dir", required=True, help="Folder for the graphs and config.json: new, or empty")
    p.add_argument("--overwrite", action="store_true", help="Replace the export already in --output-dir")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_format(args.format)  # before loading the model: a missing package, or the folder, is found at once
    check_export_folder(args.output_dir, overwrite=args.overwrite)
    with cli.naming("--model", args.model):
        model = load_pretrained(args.model)
    folder = export_model(model, args.output_dir, format=args.format, overwrite=args.overwrite)
    print(f"{args.output_dir}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    return folder


if __name__ == "__main__":
    cli.run(main)
