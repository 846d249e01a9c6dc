"""Reconstruction bake-off: the HiT decoder against taming's conv decoder and a plain ViT decoder, under one recipe,
over several seeds.

Every variant has the same encoder and codebook and is trained with the same recipe, data, steps and losses through
the package's own loop (`vqhit.training.train`); only `VQHiTConfig.decoder` differs. The recipe is the one
`train_vqhit.py --model PRESET` runs for the scale's HiT preset (`vqhit.recipes`), read from there, so the bake-off
follows the demo when the demo changes; the recipe flags below override single settings of it. Each (decoder,
seed) is a separate training run, scored on held-out photographs it never trained on (other photographs, whole,
downsampled) and on its training photographs seen the same way (the generalisation gap):

    python benchmarks/reconstruction.py --threads 1 --parallel 2  # the demo's grid, 3 decoders x 3 seeds, 2 at a time
    python benchmarks/reconstruction.py --threads 2               # the same, one run at a time
    python benchmarks/reconstruction.py --scale tiny --seeds 0    # the 8x8-grid trio, one seed
    python benchmarks/reconstruction.py --device cuda --scale paper --resolution 128 --steps 3000 --batch-size 32

Scales: `demo` is the no-argument tokenizer demo (`vqhit-demo`: f4 encoder, 1024 codes on a 16x16 grid at 64x64)
with its HiT decoder, with `--model-option decoder=conv` (taming's decoder, mirroring the encoder as in taming's
configs) and with a ViT decoder sized like the tiny trio's: just under the HiT decoder's FLOPs (3 blocks of width
180: 0.746 GFLOPs/img against 0.763; `decoder=vit` alone would build the paper-size ViT, 57M parameters). `tiny`
is the trio of 8x8-grid presets (`vqhit-tiny`, `vqgan-tiny`, `vqvit-tiny`), `paper` the paper's f16 pair and a
ViT at the HiT decoder's FLOPs.

Training runs in `--segments` equal parts (each part resumes the previous one's checkpoint; part k of every run
runs before part k + 1 of any, so a changing machine load falls on all runs alike), and the EMA model is scored
after each part. That gives two comparisons:
- equal steps: every run after all `--steps`;
- equal training wall-clock, per seed: each decoder at its last part that ended within the time the *fastest*
  decoder of that seed took for all its steps (so a slower decoder is scored after fewer steps); then the
  figures are aggregated over seeds like the equal-steps ones. Wall-clock is that of `train()`, start-up and
  checkpointing of each part included, the same machinery for every run.
With `--parallel N`, N runs of a part train at once, each in its own process with `--threads` threads (default:
the cores divided by N); the next part starts when every run has finished this one.

Metrics (`vqhit.evaluation.evaluate_tokenizer`, on uint8-rounded reconstructions, EMA model): PSNR and SSIM on
[0, 1] as mean +- std over seeds (sample std, n - 1), LPIPS-AlexNet (only when its ImageNet backbone is at hand:
`--lpips-backbone` or the torch hub cache), rFID against the held-out originals (only with Inception weights:
`--inception-weights` or the torch hub cache; on a dozen images it is a coarse number), codebook usage,
decoder parameters and GFLOPs per image (FlopCounterMode, meta device), train steps/s (steps / wall-clock of
`train()` over all parts, mean +- std over seeds) and decode ms/img (`decode_indices` of the seed-`--seeds[0]`
models at `--decode-batch`, the median of interleaved rounds). Writes a markdown file (stdout and `--markdown`),
the JSON (every run's curve, the recipe, the machine) and one PNG: the held-out originals in the top row, one row
of reconstructions per decoder (the first seed's runs), labelled with that run's held-out PSNR.

Time of the default CPU run (`--threads 1 --parallel 2`, 9 runs of the demo's 1100 steps): 59 minutes on a quiet
2-core Intel Xeon, where a run averaged 0.72 s a step (hit), 0.80 s (conv) and 0.49 s (vit), start-up and
checkpoints included, on one thread with the other run on the second core. Two threads per run on a machine busy with other processes are far slower (threads waiting on
each other at every operation), so prefer `--threads 1 --parallel 2` there.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from common import RESULTS, base_parser, count_flops, format_table, load_average, machine, setup, time_calls, write_json
from PIL import Image, ImageDraw

from vqhit import VQHiT
from vqhit.cli import usable_cores
from vqhit.data import eval_dataset
from vqhit.evaluation import GRID_GAP, GRID_LABEL_WIDTH, INCEPTION_FILE, evaluate_tokenizer
from vqhit.metrics import to_uint8
from vqhit.train_config import config_from_dict, task_defaults
from vqhit.training import MAX_TRAIN_SOURCE_IMAGES, train, train_source_view

# scale -> variant -> (preset, config overrides). The first variant's preset gives the recipe of all of them.
# A ViT decoder at just under the HiT decoder's FLOPs at each scale, as the paper-scale vit default is.
VARIANTS = {
    "demo": {"hit": ("vqhit-demo", {}), "conv": ("vqhit-demo", {"decoder": "conv"}),
             "vit": ("vqhit-demo", {"decoder": "vit", "vit_decoder_width": 180, "vit_decoder_depth": 3,
                                    "vit_decoder_heads": 4})},
    "tiny": {"hit": ("vqhit-tiny", {}), "conv": ("vqgan-tiny", {}), "vit": ("vqvit-tiny", {})},
    "paper": {"hit": ("vqhit-b-f16-1024", {}), "conv": ("vqgan-f16-1024", {}),
              "vit": ("vqhit-b-f16-1024", {"decoder": "vit"})},
}
# Settings of the recipe a flag may override (None: the recipe's value).
RECIPE_FLAGS = ("steps", "batch_size", "lr", "adam_betas", "ema_decay", "ema_start", "perceptual", "perceptual_weight",
                "vgg_weights", "adv_weight", "adv_start", "data", "num_workers")
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, what LPIPS loads


def parse_args():
    p = base_parser("reconstruction-SCALE", __doc__)  # the name of the default --json, filled in by main()
    p.add_argument("--scale", choices=tuple(VARIANTS), default="demo",
                   help="demo: the tokenizer demo's 16x16 grid (CPU); tiny: the 8x8-grid trio; paper: the paper's")
    p.add_argument("--variants", nargs="+", choices=("hit", "conv", "vit"), default=["hit", "conv", "vit"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run per decoder and seed")
    p.add_argument("--parallel", type=int, default=1, help="runs of a part trained at once, one process each")
    p.add_argument("--resolution", type=int, default=None, help="override the presets' resolution (e.g. 128)")
    p.add_argument("--segments", type=int, default=5, help="parts the training is cut into (held-out curve points)")
    recipe = p.add_argument_group("recipe", "default: the scale's HiT preset's recipe (vqhit.recipes)")
    recipe.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    recipe.add_argument("--batch-size", type=int, default=None)
    recipe.add_argument("--lr", type=float, default=None)
    recipe.add_argument("--adam-betas", type=float, nargs=2, default=None)
    recipe.add_argument("--ema-decay", type=float, default=None)
    recipe.add_argument("--ema-start", type=int, default=None)
    recipe.add_argument("--perceptual", choices=("none", "lpips", "vgg_l2"), default=None,
                        help="lpips and vgg_l2 need pretrained VGG weights (a download, or --vgg-weights)")
    recipe.add_argument("--perceptual-weight", type=float, default=None)
    recipe.add_argument("--vgg-weights", default=None, help="local torchvision vgg16 state dict")
    recipe.add_argument("--adv-weight", type=float, default=None, help="0 = no adversarial term (and no D training)")
    recipe.add_argument("--adv-start", type=int, default=None)
    recipe.add_argument("--data", default=None, help="training images")
    recipe.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--heldout", default="builtin:photos-heldout", help="held-out images (never trained on)")
    p.add_argument("--train-view", default=None, help="the training images as scored for the generalisation gap; "
                   "default: what the training's own report reads (builtin:photos-whole for builtin:photos)")
    p.add_argument("--max-heldout", type=int, default=None, help="score on the first N held-out images only")
    p.add_argument("--inception-weights", default=None, help="FID Inception weights file (rFID); default: the "
                   f"torch hub cache's {INCEPTION_FILE} if present, else rFID is n/a")
    p.add_argument("--lpips-backbone", default=None, help=f"torchvision AlexNet state dict for LPIPS; default: "
                   f"the torch hub cache's {LPIPS_BACKBONE_FILE} if present, else LPIPS is n/a")
    p.add_argument("--decode-batch", type=int, default=None, help="decode timing batch (default 8 CPU, 64 GPU)")
    p.add_argument("--out-dir", default="runs/bakeoff", help="each training run gets a fresh folder under it")
    p.add_argument("--png", default=None, help="default benchmarks/results/reconstruction-SCALE-DEVICE.png")
    p.add_argument("--markdown", default=None, help="default benchmarks/results/reconstruction-SCALE-DEVICE.md")
    args = p.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants {' '.join(args.variants)}: each decoder once")
    for name in ("parallel", "segments"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


# -- weights that may be missing offline -----------------------------------------------------------------
def _cached(name: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


def weights_at_hand(given, cached_name: str) -> str | None:
    """The given weights file, else the torch hub cache's copy, else None (the metric is then n/a)."""
    path = given or _cached(cached_name)
    return None if path is None else str(path)


# -- scoring -----------------------------------------------------------------------------------------------
def score(model, images, device, lpips_backbone=None, inception_weights=None) -> dict:
    """Metrics through the package's protocol (vqhit.evaluation.evaluate_tokenizer); LPIPS and rFID only when their
    weights were given (None = n/a)."""
    report = evaluate_tokenizer(model, images, fid=inception_weights is not None,
                                inception_weights=inception_weights, lpips=lpips_backbone is not None,
                                lpips_backbone=lpips_backbone, batch_size=16, device=device, progress=False)
    keys = ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "codebook_perplexity", "num_images")
    return {k: report["metrics"][k] for k in keys}


def score_point(model, heldout, train_view, device) -> dict:
    """PSNR, SSIM and usage on the held-out images, and PSNR/SSIM on the training photographs (the gap)."""
    held, seen = score(model, heldout, device), score(model, train_view, device)
    return {"psnr": held["psnr"], "ssim": held["ssim"], "codebook_usage": held["codebook_usage"],
            "codebook_perplexity": held["codebook_perplexity"], "train_psnr": seen["psnr"],
            "train_ssim": seen["ssim"], "gap_psnr": seen["psnr"] - held["psnr"]}


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


def load_snapshot(preset, overrides, state) -> VQHiT:
    model = VQHiT.from_preset(preset, **overrides)
    model.load_state_dict(state)
    return model


# -- training ----------------------------------------------------------------------------------------------
def bakeoff_recipe(args, preset: str) -> dict:
    """Every TrainConfig key as `train_vqhit.py --model PRESET` sets it, with the recipe flags given here."""
    values = task_defaults("vqhit", preset)
    values.update({k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None})
    values["precision"] = args.precision
    values["cpu_threads"] = args.threads or 0  # train() applies it (0: as this process already is)
    return values


def train_part(recipe: dict, preset: str, overrides: dict, seed: int, steps: int, out_dir: str,
               resume: bool) -> tuple[dict, float]:
    """Train one run up to `steps` (resuming its folder's latest checkpoint): (EMA state dict, seconds). The
    held-out report of the recipe is left to the caller, outside the timed training."""
    config = config_from_dict({
        **recipe, "model": preset, "model_options": dict(overrides), "seed": seed, "steps": steps,
        "output_dir": out_dir, "resume": "latest" if resume else None, "heldout_data": None,
        "sample_every": steps, "checkpoint_every": steps, "keep_checkpoints": 1}, source="the bake-off")
    start = time.perf_counter()
    ema = train(config, task="vqhit")
    seconds = time.perf_counter() - start
    return {key: v.detach().cpu().clone() for key, v in ema.state_dict().items()}, seconds


def train_parts(jobs: list[tuple], parallel: int) -> list[tuple[dict, float]]:
    """`train_part(*job)` for every job, in order, `parallel` at a time (each in its own process when > 1)."""
    if parallel == 1:
        return [train_part(*job) for job in jobs]
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_part, *zip(*jobs)))


# -- aggregation over seeds -----------------------------------------------------------------------------------
def mean_std(values: list) -> dict | None:
    """{"mean", "std" (sample std, None for one value), "n"}; None when any value is None (a metric not computed)."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def pm(stats: dict | None, digits: int) -> str | None:
    """'mean ± std' with `digits` decimals (just the mean for one seed)."""
    if stats is None:
        return None
    text = f"{stats['mean']:.{digits}f}"
    return text if stats["std"] is None else f"{text} ± {stats['std']:.{digits}f}"


def percent(stats: dict | None) -> dict | None:
    return None if stats is None else {k: v if v is None or k == "n" else 100 * v for k, v in stats.items()}


# -- the PNG -------------------------------------------------------------------------------------------------
def save_comparison(path: Path, originals: torch.Tensor, rows: dict) -> None:
    """Originals in the top row, one row of reconstructions per label below, with the training grids' gaps and
    label strip (vqhit.evaluation.save_reconstruction_grid)."""
    labels, images = ["original", *rows], [originals, *rows.values()]
    n, size = len(originals), originals.shape[-1]
    canvas = Image.new("RGB", (GRID_LABEL_WIDTH + n * (size + GRID_GAP) - GRID_GAP,
                               len(images) * (size + GRID_GAP) - GRID_GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, row) in enumerate(zip(labels, images)):
        y = r * (size + GRID_GAP)
        for c, image in enumerate(to_uint8(row.float().clamp(-1, 1))):
            canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (GRID_LABEL_WIDTH + c * (size + GRID_GAP), y))
        draw.text((4, y + size // 2 - 5), label, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path}")


# -- main ----------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    if args.device.startswith("cpu"):
        os.environ["ACCELERATE_USE_CPU"] = "true"  # train() runs through Accelerate, which would pick a GPU
    if args.parallel > 1 and not args.threads:
        args.threads = max(1, usable_cores() // args.parallel)
    device_tag = torch.device(args.device).type
    args.json = args.json or str(RESULTS / f"reconstruction-{args.scale}-{device_tag}.json")
    device = setup(args)
    decode_batch = args.decode_batch or (64 if device.type == "cuda" else 8)
    variants = {v: VARIANTS[args.scale][v] for v in args.variants}
    if args.resolution:
        variants = {v: (p, {**o, "resolution": args.resolution}) for v, (p, o) in variants.items()}
    recipe = bakeoff_recipe(args, VARIANTS[args.scale]["hit"][0])
    steps_total = recipe["steps"]
    if steps_total < args.segments:
        raise SystemExit(f"--steps {steps_total} is fewer than --segments {args.segments}: give at least one step a "
                         f"part")
    costs = {v: decoder_cost(p, o) for v, (p, o) in variants.items()}
    resolution = next(iter(costs.values()))["resolution"]
    train_view_source = args.train_view or train_source_view(recipe["data"])
    if train_view_source is None:
        raise SystemExit(f"--data {recipe['data']}: no local view of the training images to score the gap on; give "
                         f"--train-view FOLDER")
    heldout = eval_dataset(args.heldout, resolution, label_column=None, max_images=args.max_heldout,
                           min_size=recipe["min_size"])
    train_view = eval_dataset(train_view_source, resolution, label_column=None, min_size=recipe["min_size"],
                              max_images=MAX_TRAIN_SOURCE_IMAGES)
    lpips_backbone = weights_at_hand(args.lpips_backbone, LPIPS_BACKBONE_FILE)
    inception_weights = weights_at_hand(args.inception_weights, INCEPTION_FILE)
    extra = lpips_backbone is not None or inception_weights is not None  # metrics scored only at the table points
    na = "n/a (no weights)"
    lpips_source = f"alex, backbone {lpips_backbone}" if lpips_backbone else na
    inception_source = inception_weights or na
    print(f"held-out: {args.heldout}, {len(heldout)} images; training photographs as scored: {train_view_source}, "
          f"{len(train_view)} images; at {resolution}²; LPIPS: {lpips_source}; rFID: {inception_source}", flush=True)

    load_start = load_average()  # 1-minute load average, beside every timing
    out_root = Path(args.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    runs = [(name, seed) for seed in args.seeds for name in variants]  # per part: seed by seed, decoders in turn
    dirs = {run: tempfile.mkdtemp(prefix=f"{run[0]}-seed{run[1]}-", dir=out_root) for run in runs}  # fresh folders
    curves = {run: [] for run in runs}
    snapshots = {run: [] for run in runs}  # EMA weights after each part: kept only for LPIPS / rFID at the end
    finals = {}
    for k in range(1, args.segments + 1):
        steps = round(steps_total * k / args.segments)
        print(f"part {k} of {args.segments}: every run to step {steps} of {steps_total}", flush=True)
        jobs = [(recipe, *variants[name], seed, steps, dirs[(name, seed)], k > 1) for name, seed in runs]
        for (name, seed), (state, seconds) in zip(runs, train_parts(jobs, args.parallel)):
            curve = curves[(name, seed)]
            wall = (curve[-1]["wall_s"] if curve else 0.0) + seconds
            model = load_snapshot(*variants[name], state)
            point = score_point(model, heldout, train_view, device)
            curve.append({"step": steps, "wall_s": wall, "load_1m": load_average(), **point})
            if extra:
                snapshots[(name, seed)].append(state)
            if seed == args.seeds[0]:
                finals[name] = model  # the first seed's models: the PNG and the decode timing
            print(f"  {name} seed {seed} step {steps}: {wall:.0f} s, held-out PSNR {point['psnr']:.2f} dB, SSIM "
                  f"{point['ssim']:.3f}, training photographs {point['train_psnr']:.2f} dB, usage "
                  f"{point['codebook_usage']:.1%}", flush=True)

    # Equal training wall-clock, per seed: the fastest decoder's total time; each decoder at its last part within it.
    budgets = {seed: min(curves[(name, seed)][-1]["wall_s"] for name in variants) for seed in args.seeds}
    run_rows = []
    for name, seed in runs:
        curve, kept = curves[(name, seed)], snapshots[(name, seed)]
        i = max((j for j, point in enumerate(curve) if point["wall_s"] <= budgets[seed] * 1.02), default=0)
        final, same_time = dict(curve[-1]), dict(curve[i])
        if extra:  # LPIPS / rFID at the two table points only
            for point, state in ((final, kept[-1]), (same_time, kept[i])):
                more = score(load_snapshot(*variants[name], state), heldout, device, lpips_backbone, inception_weights)
                point.update(lpips=more["lpips"], rfid=more["rfid"])
        run_rows.append({"variant": name, "seed": seed, **final, "steps_per_s": final["step"] / final["wall_s"],
                         **{f"equal_time_{key}": v for key, v in same_time.items()},
                         "equal_time_budget_s": budgets[seed], "run_dir": dirs[(name, seed)]})

    first = args.seeds[0]
    models = {name: finals[name].to(device).eval() for name in variants}
    shape = next(iter(costs.values()))  # every variant has the same codebook and grid
    idx = torch.randint(0, shape["codebook_size"], (decode_batch, shape["grid"], shape["grid"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        timing = time_calls({n: (lambda m=m: m.decode_indices(idx)) for n, m in models.items()}, device,
                            max(args.repeats, 5), args.min_repeat_s)

    rows = []
    for name, (preset, overrides) in variants.items():
        mine = [row for row in run_rows if row["variant"] == name]
        stats = {key: mean_std([row.get(key) for row in mine]) for key in
                 ("psnr", "ssim", "train_psnr", "gap_psnr", "lpips", "rfid", "codebook_usage", "steps_per_s",
                  "equal_time_step", "equal_time_wall_s", "equal_time_psnr", "equal_time_ssim", "equal_time_train_psnr",
                  "equal_time_gap_psnr", "equal_time_lpips", "equal_time_rfid")}
        t = timing[name]
        decode_ms = 1000 * statistics.median(t["all_seconds"]) / decode_batch if "all_seconds" in t else None
        rows.append({"variant": name, "preset": preset, "model_options": overrides, **costs[name], "seeds": len(mine),
                     "decode_ms_per_img": decode_ms, "decode_load_1m": t.get("load_1m"), "stats": stats,
                     # the table's cells
                     "psnr_pm": pm(stats["psnr"], 2), "ssim_pm": pm(stats["ssim"], 3),
                     "train_psnr_pm": pm(stats["train_psnr"], 2), "gap_pm": pm(stats["gap_psnr"], 2),
                     "lpips_pm": pm(stats["lpips"], 3), "rfid_pm": pm(stats["rfid"], 1),
                     "usage_pm": pm(percent(stats["codebook_usage"]), 1), "steps_per_s_pm": pm(stats["steps_per_s"], 3),
                     "et_step_pm": pm(stats["equal_time_step"], 0), "et_wall_pm": pm(stats["equal_time_wall_s"], 0),
                     "et_psnr_pm": pm(stats["equal_time_psnr"], 2), "et_ssim_pm": pm(stats["equal_time_ssim"], 3),
                     "et_train_psnr_pm": pm(stats["equal_time_train_psnr"], 2),
                     "et_gap_pm": pm(stats["equal_time_gap_psnr"], 2), "et_lpips_pm": pm(stats["equal_time_lpips"], 3),
                     "et_rfid_pm": pm(stats["equal_time_rfid"], 1)})

    columns = [("decoder", "variant"), ("decoder params", "decoder_params"), ("GFLOPs/img", "decoder_gflops"),
               ("held-out PSNR dB", "psnr_pm"), ("held-out SSIM", "ssim_pm"), ("train-photos PSNR dB", "train_psnr_pm"),
               ("gap dB", "gap_pm"), ("LPIPS", "lpips_pm"), ("rFID", "rfid_pm"), ("usage %", "usage_pm"),
               ("train steps/s", "steps_per_s_pm"), ("decode ms/img", "decode_ms_per_img")]
    time_columns = [("decoder", "variant"), ("step", "et_step_pm"), ("train s", "et_wall_pm"),
                    ("held-out PSNR dB", "et_psnr_pm"), ("held-out SSIM", "et_ssim_pm"),
                    ("train-photos PSNR dB", "et_train_psnr_pm"), ("gap dB", "et_gap_pm"), ("LPIPS", "et_lpips_pm"),
                    ("rFID", "et_rfid_pm")]
    run_columns = [("decoder", "variant"), ("seed", "seed"), ("held-out PSNR dB", "psnr"), ("held-out SSIM", "ssim"),
                   ("train-photos PSNR dB", "train_psnr"), ("LPIPS", "lpips"), ("rFID", "rfid"),
                   ("train steps/s", "steps_per_s"), ("train s", "wall_s"),
                   ("equal-time budget s", "equal_time_budget_s"), ("equal-time step", "equal_time_step"),
                   ("equal-time PSNR dB", "equal_time_psnr")]
    curve_rows = []
    for name in variants:
        for j in range(args.segments):
            points = [curves[(name, seed)][j] for seed in args.seeds]
            curve_rows.append({"variant": name, "step": points[0]["step"],
                               "wall": pm(mean_std([p["wall_s"] for p in points]), 0),
                               **{key: pm(mean_std([p[key] for p in points]), digits) for key, digits in
                                  (("psnr", 2), ("ssim", 3), ("train_psnr", 2))},
                               "usage": pm(percent(mean_std([p["codebook_usage"] for p in points])), 1)})
    curve_columns = [("decoder", "variant"), ("step", "step"), ("train s", "wall"), ("held-out PSNR dB", "psnr"),
                     ("held-out SSIM", "ssim"), ("train-photos PSNR dB", "train_psnr"), ("usage %", "usage")]
    decimals = {"psnr": 2, "ssim": 3, "train_psnr": 2, "steps_per_s": 3, "equal_time_psnr": 2}
    run_cells = [{**row, **{k: f"{row[k]:.{d}f}" for k, d in decimals.items()}} for row in run_rows]
    seeds = " ".join(map(str, args.seeds))
    load_text = "n/a" if load_start is None else f"{load_start:.2f}"
    betas = " ".join(f"{b:g}" for b in recipe["adam_betas"])
    missing = "".join(f"\n\n{metric}: {na}" for metric, weights in (("LPIPS", lpips_backbone),
                                                                 ("rFID", inception_weights)) if weights is None)
    text = "\n\n".join([
        f"Recipe of `{VARIANTS[args.scale]['hit'][0]}` for every decoder: {steps_total} steps of batch "
        f"{recipe['batch_size']} in {args.segments} parts, Adam lr {recipe['lr']:g} betas ({betas}), EMA "
        f"{recipe['ema_decay']:g} from step {recipe['ema_start']}, perceptual {recipe['perceptual']}, adversarial "
        f"weight {recipe['adv_weight']:g}, data {recipe['data']}. Seeds {seeds}: mean ± sample std over "
        f"{len(args.seeds)} runs per decoder. Held out: {args.heldout} ({len(heldout)} images); training "
        f"photographs: {train_view_source} ({len(train_view)} images); gap = training photographs minus held-out. "
        f"{resolution}², {args.precision}, {args.threads or torch.get_num_threads()} thread(s) per run, "
        f"{args.parallel} run(s) at a time; 1-minute load average at start {load_text}. PNG: seed {first}.",
        f"Equal steps ({steps_total} steps; decode: seed {first}'s models, batch {decode_batch}, median of "
        f"{max(args.repeats, 5)} interleaved rounds)",
        format_table(rows, columns) + missing,
        "Equal training wall-clock (per seed: each decoder at its last part within the fastest decoder's time for "
        f"{steps_total} steps; then over seeds)",
        format_table(rows, time_columns), "Every run", format_table(run_cells, run_columns),
        "Held-out curve (mean ± std over seeds)", format_table(curve_rows, curve_columns)])
    print("\n" + text)

    show = torch.linspace(0, len(heldout) - 1, min(len(heldout), 12)).round().long().tolist()
    originals = torch.stack([heldout[i]["image"] for i in show])
    labelled = {f"{name} {curves[(name, first)][-1]['psnr']:.1f} dB": reconstruct(models[name], originals, device)
                for name in variants}
    png = Path(args.png or RESULTS / f"reconstruction-{args.scale}-{device_tag}.png")
    save_comparison(png, originals, labelled)
    md = Path(args.markdown or RESULTS / f"reconstruction-{args.scale}-{device_tag}.md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n")
    print(f"wrote {md}")
    info = machine(device, args)
    info["load_average_1m_at_start"] = load_start
    write_json(args.json, info, scale=args.scale, seeds=args.seeds, segments=args.segments, parallel=args.parallel,
               recipe=recipe, variants={n: {"preset": p, "model_options": o} for n, (p, o) in variants.items()},
               heldout=args.heldout, heldout_images=len(heldout), train_view=train_view_source,
               train_view_images=len(train_view), lpips=lpips_source, rfid=inception_source,
               png_seed=first, png_heldout_indices=show, equal_time_budgets_s=budgets, rows=rows, runs=run_rows,
               curves=[{"variant": n, "seed": s, "points": c} for (n, s), c in curves.items()], png=str(png))


if __name__ == "__main__":
    main()
