#!/usr/bin/env python3
"""Time from start to the first batch of a resumed *streamed* run, against its position in the stream.

    python benchmarks/resume.py                                  # positions 20 and 20,000 images
    python benchmarks/resume.py --images 4000 --positions 20 20000 200000

A local folder of small PNGs (made once under benchmarks/results/, ignored by git) is read with
`streaming=True`, as a Hub dataset would be. For each position the run's batches are drawn up to it once, the
position saved (`TrainingBatches.state_dict()`, what a checkpoint holds), and then timed, in interleaved rounds:

- `resume`: a new dataset, loader and `TrainingBatches`, `load_state_dict`, then the first batch — what a resumed
  run does before its first step;
- `replay`: drawing every batch up to the position again — what a resume that replays the stream costs.

A resume must cost the same at any position; a replay grows with it.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

import common
from vqhit.data import DataConfig, TrainingBatches, build_dataloader, build_dataset


def image_folder(path: Path, count: int, size: int = 32) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    existing = len(list(path.glob("*.png")))
    rng = np.random.default_rng(0)
    for i in range(existing, count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path / f"{i:07d}.png")
    return path


def batches(folder: Path, batch_size: int, num_workers: int) -> TrainingBatches:
    config = DataConfig(source=str(folder), resolution=16, streaming=True)
    dataset = build_dataset(config, seed=0)
    return TrainingBatches(dataset, build_dataloader(dataset, batch_size, num_workers, shuffle=True, seed=0))


def main() -> None:
    parser = common.base_parser("resume", __doc__)
    parser.add_argument("--images", type=int, default=2000, help="images in the streamed folder")
    parser.add_argument("--positions", type=int, nargs="+", default=[20, 20_000],
                        help="resume positions, in images drawn (beyond --images: later epochs)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.set_defaults(repeats=5)
    args = parser.parse_args()
    device = common.setup(args)
    folder = image_folder(common.RESULTS / "resume-images", args.images)

    states, rows = {}, []
    for position in args.positions:
        run = batches(folder, args.batch_size, args.num_workers)
        for _ in range(position // args.batch_size):
            next(run)
        states[position] = run.state_dict()

    def resume(position):
        run = batches(folder, args.batch_size, args.num_workers)
        run.load_state_dict(states[position])
        next(run)

    def replay(position):
        run = batches(folder, args.batch_size, args.num_workers)
        for _ in range(position // args.batch_size + 1):
            next(run)

    times = {(kind, p): [] for kind in ("resume", "replay") for p in args.positions}
    loads = []
    for _ in range(args.repeats):
        loads.append(common.load_average())
        for position in args.positions:
            for kind, fn in (("resume", resume), ("replay", replay)):
                start = time.perf_counter()
                fn(position)
                times[kind, position].append(time.perf_counter() - start)
    first = args.positions[0]
    for position in args.positions:
        resume_s, replay_s = (statistics.median(times[kind, position]) for kind in ("resume", "replay"))
        rows.append({"position": position, "epoch": position // args.images, "resume_s": resume_s,
                     "resume_vs_first": resume_s / statistics.median(times["resume", first]), "replay_s": replay_s,
                     "all_resume_s": times["resume", position], "all_replay_s": times["replay", position]})
    print(common.format_table(rows, [("position (images)", "position"), ("epoch", "epoch"),
                                     ("resume to first batch (s, median)", "resume_s"),
                                     ("vs the first position", "resume_vs_first"),
                                     ("replay to the same batch (s, median)", "replay_s")]))
    info = {**common.machine(device, args), "images": args.images, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "load_1m_per_round": loads}
    common.write_json(args.json or str(common.RESULTS / "resume-cpu.json"), info, rows=rows)


if __name__ == "__main__":
    main()
