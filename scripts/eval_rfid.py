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
below N instead. A JSON report and a printed table state every setting; when --model is a local
save_pretrained folder, its README.md model card gets the figures and the settings too, naming the weights they
belong to (sha256 of model.safetensors, and the training step of a training run's export): a later export of
other weights into the folder removes them.
Offline: --inception-weights and --lpips-backbone take local files. The figures that need no weights at all
(PSNR, SSIM, codebook usage and perplexity) come from

    python scripts/eval_rfid.py --model runs/vqhit-demo/model --data builtin:photos-heldout --no-fid --no-lpips
"""
import argparse
from pathlib import Path

from vqhit import cli
from vqhit.evaluation import (DETERMINISTIC_TRANSFORMS, eval_dataset, evaluate_tokenizer, flatten,
                              format_report, process_state, write_report)
from vqhit.models.pretrained import training_step, weights_sha256, write_model_card
from vqhit.models.vqhit import VQHiT
from vqhit.precision import PRECISIONS


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="The tokenizer: a save_pretrained folder (use the EMA export, "
                   "e.g. runs/vqhit-demo/model) or a Hugging Face Hub repository id; evaluated in eval mode")
    p.add_argument("--data", required=True, help="Evaluation images: a local image folder, a Hub dataset id, or "
                   "'builtin:photos'")
    p.add_argument("--split", default="train", help="Dataset split: 'validation' for Hub ImageNet; a plain image "
                   "folder's only split is 'train' (default: %(default)s)")
    p.add_argument("--image-column", default="image", help="Image column of a Hub dataset (default: %(default)s)")
    p.add_argument("--transform", default="adm_center_crop", choices=DETERMINISTIC_TRANSFORMS,
                   help="Crop protocol to the model's resolution (default: %(default)s, the ADM protocol)")
    p.add_argument("--num-images", type=cli.int_at_least(1), default=None, help="Evaluate only the first N images "
                   "(quick runs; the paper protocol uses all 50k ImageNet validation images)")
    p.add_argument("--min-size", type=cli.int_at_least(0), default=0, help="Skip images whose short side is below N "
                   "pixels (counted as skipped); 0 keeps every image, upsampling those smaller than the resolution "
                   "as ADM's protocol does (default: %(default)s)")
    p.add_argument("--no-fid", action="store_true", help="Skip rFID: no Inception network or weights. LPIPS "
                   "still needs its AlexNet backbone (downloaded, or --lpips-backbone); with --no-lpips too, no metric "
                   "needs downloaded weights: PSNR, SSIM, codebook usage and perplexity")
    p.add_argument("--ref-stats", default=None, help="Cache of the originals' Inception statistics (.npz): loaded "
                   "if the file exists (and must match this data/crop/#images/Inception), else computed and saved")
    p.add_argument("--inception-weights", default=None, help="Local file of torch-fidelity's Inception weights "
                   "(weights-inception-2015-12-05-6726825d.pth) for offline use; default: downloaded once")
    p.add_argument("--lpips-backbone", default=None, help="Local torchvision AlexNet state dict "
                   "(alexnet-owt-7be5be79.pth) for LPIPS offline; default: torchvision's, downloaded once")
    p.add_argument("--no-lpips", action="store_true", help="Skip LPIPS: no AlexNet backbone needed")
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=32, help="Images per process per batch "
                   "(default: %(default)s)")
    p.add_argument("--num-workers", type=cli.int_at_least(0), default=cli.default_num_workers(), help="DataLoader "
                   "workers per process (default: %(default)s here: up to 4, one fewer than the cores)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="Tokenizer precision: fp32 or bf16 "
                   "autocast; Inception always runs in float32 (default: %(default)s)")
    p.add_argument("--bad-images", default="skip", choices=["skip", "raise"], help="Unreadable images (and those "
                   "below --min-size): skip (counted in the report) or stop (default: %(default)s)")
    p.add_argument("--output-dir", default="eval", help="Where eval_rfid.json is written (default: %(default)s)")
    p.add_argument("--no-model-card", action="store_true", help="Leave the model folder's README.md alone (by "
                   "default a local --model folder gets a model card with these figures and settings)")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    local = Path(args.model).is_dir()  # a save_pretrained folder (not a Hub id): its card gets the figures
    weights = {"weights_sha256": weights_sha256(args.model), "training_step": training_step(args.model)} \
        if local else {}
    with cli.naming("--model", args.model):
        model = VQHiT.from_pretrained(args.model)
    dataset = eval_dataset(args.data, model.config.resolution, transform=args.transform, split=args.split,
                           image_column=args.image_column, label_column=None, max_images=args.num_images,
                           bad_images=args.bad_images, min_size=args.min_size)
    report = evaluate_tokenizer(model, dataset, model_id=args.model, fid=not args.no_fid, ref_stats=args.ref_stats,
                                inception_weights=args.inception_weights, lpips=not args.no_lpips,
                                lpips_backbone=args.lpips_backbone, batch_size=args.batch_size,
                                num_workers=args.num_workers, precision=args.precision, progress=not args.no_progress)
    report["settings"].update(weights)
    if process_state().is_main_process:
        path = write_report(report, f"{args.output_dir}/eval_rfid.json")
        print(format_report(report, f"VQ-HiT reconstruction ({path})"))
        if local and not args.no_model_card:
            if weights_sha256(args.model) != weights["weights_sha256"]:  # e.g. a training run exported meanwhile
                print(f"model card not written: {args.model}/model.safetensors changed during the evaluation; the "
                      f"figures (of the weights it held before) are in {path}")
            else:
                print(f"model card: {write_model_card(args.model, *model_card_tables(report))}")
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
