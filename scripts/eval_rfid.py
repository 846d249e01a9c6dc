#!/usr/bin/env python3
"""Evaluate a VQ-HiT tokenizer: rFID, PSNR, SSIM, LPIPS, codebook usage and perplexity.

    python scripts/eval_rfid.py --model runs/vqhit-demo/model --data builtin:photos --num-images 64
    accelerate launch --num_processes 8 scripts/eval_rfid.py --model runs/vqhit/model \\
        --data /data/imagenet/val --ref-stats stats/imagenet256_val_adm.npz       # the ImageNet-256 protocol

Every image goes through the tokens: x -> encode -> decode_indices -> uint8. rFID compares the Inception
statistics of the originals and the reconstructions (torch-fidelity's TF-ported Inception, uint8 by rounding,
float64 statistics summed over processes, no padding). The default crop is ADM's (box-downsample while the
short side >= 2x the resolution, bicubic resize of the short side to the resolution, center crop): images
smaller than the resolution are upsampled, not dropped, as in ADM; --min-size N skips those whose short side is
below N instead. A JSON report and a printed table state every setting, and codebook_usage.png plots the
codes' frequencies, sorted; when --model is a local save_pretrained folder, its README.md model card gets the
figures and the settings too, naming the weights they belong to (sha256 of model.safetensors, and the training
step of a training run's export): a later export of other weights into the folder removes them.
Offline: --inception-weights and --lpips-backbone take local files. The figures that need no weights at all
(PSNR, SSIM, codebook usage and perplexity) come from

    python scripts/eval_rfid.py --model runs/vqhit-demo/model --data builtin:photos-heldout --no-fid --no-lpips
"""
import argparse
from pathlib import Path

from vqhit import cli
from vqhit.distributed import process_state
from vqhit.evaluation import evaluate_tokenizer, flatten, format_report, write_report
from vqhit.files import check_output_folder
from vqhit.models.model_card import training_step, weights_sha256, weights_signature, write_model_card
from vqhit.models.vqhit import VQHiT

REPORT, PLOT = "eval_rfid.json", "codebook_usage.png"


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_option(p, "The tokenizer", "runs/vqhit-demo/model", note="; evaluated in eval mode")
    cli.add_dataset_options(p, "Evaluation images", transform="adm_center_crop")
    p.add_argument("--num-images", type=cli.int_at_least(1), default=None, help="Evaluate only the first N images "
                   "(quick runs; the paper protocol uses all 50k ImageNet validation images)")
    p.add_argument("--no-fid", action="store_true", help="Skip rFID: no Inception network or weights. LPIPS "
                   "still needs its AlexNet backbone (downloaded, or --lpips-backbone); with --no-lpips too, no metric "
                   "needs downloaded weights: PSNR, SSIM, codebook usage and perplexity")
    p.add_argument("--ref-stats", default=None, help="Cache of the originals' Inception statistics (.npz): loaded "
                   "if the file exists (and must match this data/crop/#images/Inception), else computed and saved")
    cli.add_inception_weights_option(p)
    p.add_argument("--lpips-backbone", default=None, help="Local torchvision AlexNet state dict "
                   "(alexnet-owt-7be5be79.pth) for LPIPS offline; default: torchvision's, downloaded once")
    p.add_argument("--no-lpips", action="store_true", help="Skip LPIPS: no AlexNet backbone needed")
    p.add_argument("--output-dir", default="eval", help="Where eval_rfid.json and codebook_usage.png (the codes' "
                   "frequencies, sorted) are written; one that already holds either (another model's, or an earlier "
                   "run's) is refused at the start: give each evaluation its own folder, or pass --overwrite "
                   "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="Replace the eval_rfid.json and codebook_usage.png of "
                   "--output-dir")
    p.add_argument("--no-model-card", action="store_true", help="Leave the model folder's README.md alone (by "
                   "default a local --model folder gets a model card with these figures and settings)")
    cli.add_run_options(p, batch_size=32, batch_of="images", precision_note="for the tokenizer; Inception always "
                        "runs in float32")
    return p.parse_args(argv)


def main(argv=None):
    args = cli.with_launcher_settings(parse_args(argv), "eval_rfid.py")
    check_output_folder(args.output_dir, [REPORT, PLOT], overwrite=args.overwrite)  # before the evaluation, not after
    local = Path(args.model).is_dir()  # a save_pretrained folder (not a Hub id): its card gets the figures
    signature = weights_signature(args.model) if local else None  # taken first: a replacement after it is seen
    weights = {"weights_sha256": weights_sha256(args.model), "training_step": training_step(args.model)} \
        if local else {}
    model = cli.load_model(VQHiT, args)
    dataset = cli.eval_dataset_from_args(args, model.config.resolution, max_images=args.num_images)
    report = evaluate_tokenizer(model, dataset, model_id=args.model, fid=not args.no_fid, ref_stats=args.ref_stats,
                                inception_weights=args.inception_weights, lpips=not args.no_lpips,
                                lpips_backbone=args.lpips_backbone, batch_size=args.batch_size,
                                num_workers=args.num_workers, precision=args.precision, progress=not args.no_progress,
                                codebook_plot=Path(args.output_dir) / PLOT)
    report["settings"].update(weights)
    if process_state().is_main_process:
        path = write_report(report, Path(args.output_dir) / REPORT)
        print(format_report(report, f"VQ-HiT reconstruction ({path})"))
        print(f"codebook plot: {Path(args.output_dir) / PLOT}")
        if local and not args.no_model_card:
            if weights_signature(args.model) != signature:  # e.g. a training run exported meanwhile
                print(f"model card not written: {args.model}/model.safetensors changed during the evaluation; the "
                      f"figures (of the weights it held before) are in {path}")
            else:
                card = write_model_card(args.model, *model_card_tables(report), sha256=weights["weights_sha256"])
                print(f"model card: {card}")
    return report


def model_card_tables(report: dict) -> tuple[dict, dict]:
    """The report's measured figures and its settings as the flat tables of a model card (nested keys as a.b)."""
    names = {"rfid": "rFID", "psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS (AlexNet)",
             "codebook_usage": "codebook usage", "codebook_perplexity": "codebook perplexity",
             "num_images": "images", "num_skipped": "images skipped", "num_upsampled": "images upsampled"}
    metrics = {names.get(k, k): v for k, v in report["metrics"].items() if v is not None}
    return metrics, flatten(report["settings"])


if __name__ == "__main__":
    cli.run(main)
