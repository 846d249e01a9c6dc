"""Reconstruction bake-off: the HiT decoder against taming's conv decoder and a plain ViT decoder, under one recipe.

Every variant has the same encoder and codebook and is trained with the same seed, data, steps, batch and
losses through the package's own loop (`vqhit.training.train`); only `VQHiTConfig.decoder` differs. Each is
then scored on held-out photographs that are not in its training set (different photographs, not other tiles):

    python benchmarks/reconstruction.py                          # CPU: the tiny trio at 64², <= 30 min on 2 cores
    python benchmarks/reconstruction.py --device cuda --scale paper --resolution 128 --steps 3000 --batch-size 32

Training runs in `--segments` equal parts (each part resumes the previous one's checkpoint; part k of every
variant runs before part k + 1 of any, so a changing machine load falls on all alike), and the EMA model is
scored on the held-out images after each part. That gives two comparisons from one run per variant:
- equal steps: every variant after all `--steps`;
- equal training wall-clock: every variant at its last part that ended within the time the *fastest* variant
  took for all its steps (so a slower decoder is scored after fewer steps). Wall-clock is that of
  `train()`, start-up and checkpointing of each part included, the same machinery for every variant.

Metrics (`vqhit.evaluation.evaluate_tokenizer`, on uint8-rounded reconstructions): PSNR and SSIM on [0, 1],
LPIPS-AlexNet (only when its ImageNet backbone is at hand: `--lpips-backbone` or the torch hub cache), codebook
usage and perplexity over the held-out set, rFID against the held-out originals (only with Inception weights:
`--inception-weights` or the torch hub cache; on ~100 images it is a coarse number), decode images/s
(`decode_indices`, interleaved rounds, median), decoder parameters and GFLOPs per image (FlopCounterMode, meta
device). Writes a markdown table (stdout and `--markdown`), the JSON (`benchmarks/results/`) and one PNG: the
held-out originals in the top row, each variant's reconstructions below.
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, base_parser, count_flops, format_table, machine, setup, time_calls, write_json
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from vqhit import VQHiT
from vqhit.evaluation import INCEPTION_FILE, eval_dataset, evaluate_tokenizer
from vqhit.metrics import to_uint8
from vqhit.train_config import TrainConfig
from vqhit.training import train

# variant -> (preset, config overrides), per scale. The paper scale's vit uses VQHiTConfig's vit defaults, which
# are sized to the paper HiT decoder's FLOPs.
VARIANTS = {
    "tiny": {"hit": ("vqhit-tiny", {}), "conv": ("vqgan-tiny", {}), "vit": ("vqvit-tiny", {})},
    "paper": {"hit": ("vqhit-b-f16-1024", {}), "conv": ("vqgan-f16-1024", {}),
              "vit": ("vqhit-b-f16-1024", {"decoder": "vit"})},
}
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, what LPIPS loads


def parse_args():
    p = base_parser("reconstruction", __doc__)
    p.add_argument("--scale", choices=tuple(VARIANTS), default="tiny", help="tiny presets (CPU) or the paper's")
    p.add_argument("--variants", nargs="+", choices=("hit", "conv", "vit"), default=["hit", "conv", "vit"])
    p.add_argument("--resolution", type=int, default=None, help="override the presets' resolution (e.g. 128)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per variant")
    p.add_argument("--segments", type=int, default=5, help="parts the training is cut into (held-out curve points)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--adam-betas", type=float, nargs=2, default=[0.0, 0.99])
    p.add_argument("--ema-decay", type=float, default=0.95, help="short runs: the recipes' 0.999 would still "
                   "hold mostly the initial weights")
    p.add_argument("--ema-start", type=int, default=100)
    p.add_argument("--perceptual", choices=("none", "lpips", "vgg_l2"), default="none",
                   help="none by default: both need pretrained VGG weights (a download)")
    p.add_argument("--perceptual-weight", type=float, default=None)
    p.add_argument("--vgg-weights", default=None, help="local torchvision vgg16 state dict")
    p.add_argument("--adv-weight", type=float, default=0.0, help="0 = no adversarial term (and no D training)")
    p.add_argument("--adv-start", type=int, default=0)
    p.add_argument("--data", default="builtin:photos", help="training images")
    p.add_argument("--heldout", default="builtin:photos-heldout", help="held-out images (never trained on)")
    p.add_argument("--max-heldout", type=int, default=None, help="score on the first N held-out images only")
    p.add_argument("--inception-weights", default=None, help="FID Inception weights file (rFID); default: the "
                   f"torch hub cache's {INCEPTION_FILE} if present, else rFID is n/a")
    p.add_argument("--lpips-backbone", default=None, help=f"torchvision AlexNet state dict for LPIPS; default: "
                   f"the torch hub cache's {LPIPS_BACKBONE_FILE} if present, else LPIPS is n/a")
    p.add_argument("--decode-batch", type=int, default=None, help="decode timing batch (default 8 CPU, 64 GPU)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="runs/bakeoff", help="each training run gets a fresh folder under it")
    p.add_argument("--png", default=None, help="default benchmarks/results/reconstruction-DEVICE.png")
    p.add_argument("--markdown", default=None, help="default benchmarks/results/reconstruction-DEVICE.md")
    return p.parse_args()


# -- weights that may be missing offline -----------------------------------------------------------------
def _cached(name: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


def weights_at_hand(given, cached_name: str) -> str | None:
    """The given weights file, else the torch hub cache's copy, else None (the metric is then n/a)."""
    path = given or _cached(cached_name)
    return None if path is None else str(path)


# -- scoring -----------------------------------------------------------------------------------------------
def score(model, heldout, device, lpips_backbone=None, inception_weights=None) -> dict:
    """Held-out metrics through the package's protocol (vqhit.evaluation.evaluate_tokenizer); LPIPS and rFID
    only when their weights were found (None = n/a)."""
    report = evaluate_tokenizer(model, heldout, fid=inception_weights is not None,
                                inception_weights=inception_weights, lpips=lpips_backbone is not None,
                                lpips_backbone=lpips_backbone, batch_size=16, device=device, progress=False)
    keys = ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "codebook_perplexity", "num_images")
    return {k: report["metrics"][k] for k in keys}


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, device) -> torch.Tensor:
    """Token round trip of a few images, uint8-rounded as saved (for the PNG)."""
    model = model.to(device).eval()
    return to_uint8(model.decode_indices(model.encode(images.to(device))).float()).float().cpu() / 127.5 - 1


def decoder_cost(preset: str, overrides: dict) -> dict:
    with torch.device("meta"):
        model = VQHiT.from_preset(preset, **overrides)
    c = model.config
    flops, _ = count_flops(lambda: model.decoder(torch.zeros(1, c.grid, c.grid, c.code_dim, device="meta")))
    return {"decoder_params": sum(p.numel() for p in model.decoder.parameters()),
            "params": sum(p.numel() for p in model.parameters()), "decoder_gflops": flops / 1e9,
            "grid": c.grid, "codebook_size": c.codebook_size, "resolution": c.resolution}


# -- training ----------------------------------------------------------------------------------------------
def train_segment(preset, overrides, args, steps: int, out_dir: Path, resume: bool):
    """Train `preset` up to `steps` (resuming the folder's latest checkpoint); (EMA model, seconds)."""
    config = TrainConfig(
        model=preset, model_options=dict(overrides), data=args.data, transform="random_crop", flip=True,
        batch_size=args.batch_size, steps=steps, lr=args.lr, adam_betas=list(args.adam_betas),
        ema_decay=args.ema_decay, ema_start=args.ema_start, perceptual=args.perceptual,
        perceptual_weight=args.perceptual_weight, vgg_weights=args.vgg_weights,
        adv_weight=args.adv_weight, adv_start=args.adv_start, r1_interval=4,  # lazy R1 (x4): only with --adv-weight
        disc_max_channels=64 if args.scale == "tiny" else 512, precision=args.precision,
        seed=args.seed, num_workers=args.num_workers, output_dir=str(out_dir), log_every=10,
        sample_every=steps, checkpoint_every=steps, keep_checkpoints=1, resume="latest" if resume else None)
    start = time.perf_counter()
    ema = train(config, task="vqhit")
    return ema, time.perf_counter() - start


def load_snapshot(preset, overrides, state) -> VQHiT:
    model = VQHiT.from_preset(preset, **overrides)
    model.load_state_dict(state)
    return model


# -- the PNG -------------------------------------------------------------------------------------------------
def save_comparison(path: Path, originals: torch.Tensor, rows: dict) -> None:
    """Originals in the top row, one row per variant, each labelled at the left."""
    images = [originals] + list(rows.values())
    grid = make_grid(torch.cat(images).clamp(-1, 1) * 0.5 + 0.5, nrow=len(originals), padding=2, pad_value=1)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    label_w, row_h = 60, grid.shape[1] // len(images)
    canvas = Image.new("RGB", (array.shape[1] + label_w, array.shape[0]), "white")
    canvas.paste(Image.fromarray(array), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(["original", *rows]):
        draw.text((4, i * row_h + row_h // 2 - 5), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path}")


# -- main ----------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    if args.device.startswith("cpu"):
        os.environ["ACCELERATE_USE_CPU"] = "true"  # train() runs through Accelerate, which would pick a GPU
    device = setup(args)
    decode_batch = args.decode_batch or (64 if device.type == "cuda" else 8)
    out_root = Path(args.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    variants = {v: VARIANTS[args.scale][v] for v in args.variants}
    if args.resolution:
        variants = {v: (p, {**o, "resolution": args.resolution}) for v, (p, o) in variants.items()}
    costs = {v: decoder_cost(p, o) for v, (p, o) in variants.items()}
    resolution = next(iter(costs.values()))["resolution"]
    heldout = eval_dataset(args.heldout, resolution, transform="center_crop", label_column=None,
                           max_images=args.max_heldout)
    lpips_backbone = weights_at_hand(args.lpips_backbone, LPIPS_BACKBONE_FILE)
    inception_weights = weights_at_hand(args.inception_weights, INCEPTION_FILE)
    na = "n/a (no weights)"
    lpips_source = f"alex, backbone {lpips_backbone}" if lpips_backbone else na
    inception_source = inception_weights or na
    print(f"held-out: {args.heldout}, {len(heldout)} images at {resolution}²; LPIPS: {lpips_source}; "
          f"rFID: {inception_source}", flush=True)

    load_start = os.getloadavg()[0]
    # Segment k of every variant, then segment k + 1 of every variant: the machine's load (shared, changing)
    # then falls on all variants alike, as in common.time_calls' interleaved rounds.
    dirs = {name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=out_root)) for name in variants}  # fresh folders
    curves, snapshots = {name: [] for name in variants}, {name: [] for name in variants}
    for k in range(1, args.segments + 1):
        steps = round(args.steps * k / args.segments)
        for name, (preset, overrides) in variants.items():
            print(f"training {name} ({preset} {overrides or ''}) to step {steps} of {args.steps}", flush=True)
            ema, seconds = train_segment(preset, overrides, args, steps, dirs[name], resume=k > 1)
            wall = (curves[name][-1]["wall_s"] if curves[name] else 0.0) + seconds
            metrics = score(copy.deepcopy(ema), heldout, device)  # the curve: no LPIPS / rFID
            curves[name].append({"step": steps, "wall_s": wall, "load_1m": os.getloadavg()[0], **metrics})
            snapshots[name].append({key: v.detach().cpu().clone() for key, v in ema.state_dict().items()})
            print(f"  {name} step {steps}: {wall:.0f} s, held-out PSNR {metrics['psnr']:.2f} dB, SSIM "
                  f"{metrics['ssim']:.3f}, usage {metrics['codebook_usage']:.1%}", flush=True)

    # Equal training wall-clock: the fastest variant's total time; each variant at its last part within it.
    budget = min(curve[-1]["wall_s"] for curve in curves.values())
    at_budget = {name: max((i for i, point in enumerate(curve) if point["wall_s"] <= budget * 1.02), default=0)
                 for name, curve in curves.items()}

    show = torch.linspace(0, len(heldout) - 1, 8).round().long().tolist()  # spread over the held-out photos
    originals = torch.stack([heldout[i]["image"] for i in show])
    rows, recs, models = [], {}, {}
    for name, (preset, overrides) in variants.items():
        final = load_snapshot(preset, overrides, snapshots[name][-1])
        metrics = score(final, heldout, device, lpips_backbone, inception_weights)
        recs[name] = reconstruct(final, originals, device)
        i = at_budget[name]
        same_time = metrics if i == len(curves[name]) - 1 else score(
            load_snapshot(preset, overrides, snapshots[name][i]), heldout, device, lpips_backbone, inception_weights)
        models[name] = final.to(device).eval()
        last = curves[name][-1]
        rows.append({"variant": name, "preset": preset, **costs[name], **metrics,
                     "train_s": last["wall_s"], "steps_per_s": last["step"] / last["wall_s"],
                     "equal_time_step": curves[name][i]["step"], "equal_time_s": curves[name][i]["wall_s"],
                     **{f"equal_time_{k}": v for k, v in same_time.items()}})

    idx = torch.randint(0, rows[0]["codebook_size"], (decode_batch, rows[0]["grid"], rows[0]["grid"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        timing = time_calls({n: (lambda m=m: m.decode_indices(idx)) for n, m in models.items()}, device,
                            max(args.repeats, 5), args.min_repeat_s)
    for row in rows:
        t = timing[row["variant"]]
        row["decode_img_s"] = decode_batch / statistics.median(t["all_seconds"]) if "all_seconds" in t else None

    columns = [("decoder", "variant"), ("preset", "preset"), ("decoder params", "decoder_params"),
               ("decoder GFLOPs/img", "decoder_gflops"), ("PSNR dB", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"),
               ("rFID", "rfid"), ("usage", "codebook_usage"), ("perplexity", "codebook_perplexity"),
               ("decode img/s", "decode_img_s"), ("train steps/s", "steps_per_s"), ("train s", "train_s")]
    time_columns = [("decoder", "variant"), ("step", "equal_time_step"), ("train s", "equal_time_s"),
                    ("PSNR dB", "equal_time_psnr"), ("SSIM", "equal_time_ssim"), ("LPIPS", "equal_time_lpips"),
                    ("rFID", "equal_time_rfid"), ("usage", "equal_time_codebook_usage")]
    curve_rows = [{"variant": n, **p} for n, c in curves.items() for p in c]
    curve_columns = [("decoder", "variant"), ("step", "step"), ("train s", "wall_s"), ("PSNR dB", "psnr"),
                     ("SSIM", "ssim"), ("usage", "codebook_usage")]
    text = "\n\n".join([
        f"Equal steps ({args.steps} steps, batch {args.batch_size}, {len(heldout)} held-out images at "
        f"{resolution}²; LPIPS: {lpips_source}; rFID: {inception_source})",
        format_table(rows, columns) + ("\n\nLPIPS: " + na if lpips_backbone is None else "")
        + ("\nrFID: " + na if inception_weights is None else ""),
        f"Equal training wall-clock ({budget:.0f} s, the fastest variant's time for {args.steps} steps)",
        format_table(rows, time_columns), "Held-out curve", format_table(curve_rows, curve_columns)])
    print("\n" + text)

    device_tag = device.type
    png = Path(args.png or RESULTS / f"reconstruction-{device_tag}.png")
    save_comparison(png, originals, recs)
    md = Path(args.markdown or RESULTS / f"reconstruction-{device_tag}.md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n")
    info = machine(device, args)
    info["load_average_1m_at_start"] = load_start
    recipe = {k: getattr(args, k) for k in ("scale", "resolution", "steps", "segments", "batch_size", "lr",
                                            "adam_betas", "ema_decay", "ema_start", "perceptual",
                                            "perceptual_weight", "adv_weight", "adv_start", "data", "heldout",
                                            "seed", "decode_batch")}
    write_json(args.json, info, recipe=recipe, lpips=lpips_source, rfid=inception_source,
               heldout_images=len(heldout), equal_time_budget_s=budget, rows=rows, curves=curves,
               run_dirs={n: str(d) for n, d in dirs.items()}, png=str(png))


if __name__ == "__main__":
    main()
