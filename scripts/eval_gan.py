#!/usr/bin/env python3
"""Evaluate a HiT generator: FID and Inception Score, a sample grid and latent interpolation strips.

    python scripts/eval_gan.py --model runs/hit-tiny/model --data builtin:photos --num-samples 1000
    accelerate launch --num_processes 8 scripts/eval_gan.py --model runs/ffhq256/model \\
        --data /data/ffhq256 --transform resize --ref-stats stats/ffhq256.npz           # 50k samples
    python scripts/eval_gan.py --model runs/celebahq256/model --ref-stats stats/celebahq256.npz --num-samples 30000

Samples are z ~ N(0, I) (no truncation) from the EMA generator in eval mode. Process r of W draws exactly its
share of --num-samples from a generator seeded by (--seed, r), so nothing is padded or counted twice (the sample
set depends on the seed and W). FID against --ref-stats (loaded if the file exists) or the statistics of --data
(saved to --ref-stats when given); IS over splits of --is-split-size. The grid and the interpolation strips
(the paper's Figure 7) are drawn by the main process.
"""
import argparse
import os
from pathlib import Path

from vqhit import cli
from vqhit.distributed import process_state
from vqhit.errors import UsageError
from vqhit.evaluation import (INTERPOLATIONS, evaluate_generator, format_report, save_interpolations, save_sample_grid,
                              write_report)
from vqhit.files import check_output_folder
from vqhit.models.hit import HiTGenerator


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_option(p, "The generator", "runs/hit-tiny/model")
    cli.add_dataset_options(p, "Reference images for FID", transform="center_crop", required=False,
                            data_note="; needed unless --ref-stats names an existing file")
    p.add_argument("--ref-stats", default=None, help="Reference Inception statistics (.npz with mu and sigma; "
                   "vqhit, pytorch-fid and torch-fidelity files work): loaded if it exists, else computed from "
                   "--data and saved here")
    p.add_argument("--num-ref-images", type=cli.int_at_least(1), default=None, help="Use only the first N reference "
                   "images (default: all)")
    p.add_argument("--num-samples", type=cli.int_at_least(1), default=50_000, help="Generated samples for FID and IS "
                   "(default: %(default)s; the paper uses 30000 for CelebA-HQ)")
    p.add_argument("--is-split-size", type=cli.int_at_least(1), default=5000, help="Samples per Inception Score "
                   "split (default: %(default)s)")
    p.add_argument("--seed", type=cli.int_at_least(0), default=0, help="Seed of the latents (default: %(default)s)")
    cli.add_inception_weights_option(p)
    p.add_argument("--grid-size", type=cli.int_at_least(0), default=8, help="The sample grid is N x N images; 0 "
                   "skips it (default: %(default)s)")
    p.add_argument("--interp-rows", type=cli.int_at_least(0), default=4, help="Interpolation strips (rows), each "
                   "between two random latents; 0 skips them (default: %(default)s)")
    p.add_argument("--interp-steps", type=cli.int_at_least(2), default=8, help="Images per interpolation strip, "
                   "endpoints included (default: %(default)s)")
    p.add_argument("--interpolation", default="linear", choices=INTERPOLATIONS, help="Linear interpolation "
                   "z0 + t (z1 - z0), or spherical (slerp) (default: %(default)s)")
    p.add_argument("--output-dir", default="eval", help="Where eval_gan.json, samples.png and interpolation.png "
                   "are written; one that already holds any of them (another model's, or an earlier run's) is "
                   "refused at the start: give each evaluation its own folder, or pass --overwrite "
                   "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="Replace those files of --output-dir")
    cli.add_run_options(p, batch_size=50, batch_of="samples (and reference images)", precision_note="for the "
                        "generator; Inception always runs in float32")
    return p.parse_args(argv)


def main(argv=None):
    args = cli.with_launcher_settings(parse_args(argv), "eval_gan.py")
    out = Path(args.output_dir)
    outputs = ["eval_gan.json", *["samples.png"] * (args.grid_size > 0),
               *["interpolation.png"] * (args.interp_rows > 0)]
    check_output_folder(out, outputs, overwrite=args.overwrite)  # before the evaluation, not after
    if args.data is None and (args.ref_stats is None or not os.path.exists(args.ref_stats)):
        raise UsageError("eval_gan.py needs a reference: --data, or --ref-stats naming an existing .npz")
    generator = cli.load_model(HiTGenerator, args)
    dataset = None
    if args.data is not None:
        dataset = cli.eval_dataset_from_args(args, generator.config.resolution, max_images=args.num_ref_images)
    report = evaluate_generator(generator, num_samples=args.num_samples, dataset=dataset, ref_stats=args.ref_stats,
                                model_id=args.model, inception_weights=args.inception_weights,
                                batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                                is_split_size=args.is_split_size, precision=args.precision,
                                progress=not args.no_progress)
    if process_state().is_main_process:
        files = {}
        if args.grid_size > 0:
            files["sample_grid"] = str(save_sample_grid(generator, out / "samples.png", rows=args.grid_size,
                                                        cols=args.grid_size, seed=args.seed))
        if args.interp_rows > 0:
            files["interpolation"] = str(save_interpolations(generator, out / "interpolation.png",
                                                             rows=args.interp_rows, steps=args.interp_steps,
                                                             seed=args.seed, mode=args.interpolation))
        report["settings"]["interpolation"] = args.interpolation
        report["files"] = files
        path = write_report(report, out / "eval_gan.json")
        print(format_report(report, f"HiT generator ({path})"))
    return report


if __name__ == "__main__":
    cli.run(main)
