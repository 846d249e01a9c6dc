"""Training steps at the paper's scale: the GAN step of a generator preset, and the tokenizer's step.

GAN (`--presets`): one full step as `vqhit.training.Trainer.train_step` runs it (R1 every step, no bCR, no EMA):

    G step: fake = G(z); loss = g_nonsaturating(D(fake)) with D frozen; backward; Adam step
    D step: r1, D(real) = r1_penalty(D, real) (fp32); d_logistic(D(real), D(fake.detach())) + r1; backward; Adam

The D step runs D on the real images once: R1's forward (fp32, the input requiring grad) also gives the logits of
the logistic loss. `--d-step-presets` times that D step beside the same step with D run on the reals twice (once
under autocast for the loss, once inside R1), in interleaved rounds, and reports the gain.

Reports images/s, peak memory (CUDA: torch.cuda.max_memory_allocated) and the bytes autograd keeps for the
backward of the G step, with and without `checkpoint_mlp`. Those bytes are counted by running the G step on
the meta device (exact, no compute), so they are given for every preset in `--memory-presets`, even where
the step is too slow to time on CPU.

Tokenizer (`--tokenizer-decoders`): `Trainer.train_step` itself, for vqhit-b-f16-1024's paper recipe (L2 + VGG
feature loss + VQ + adversarial 0.1, R1 10 every step, D channel multiplier 1) with the HiT decoder ("hit") and with
taming's decoder in its place ("conv": `--model-option decoder=conv`, the vqgan-f16-1024 preset). The VGG has random
weights: the same work, no download. Each decoder runs in a fresh process, so its peak memory (CUDA: the
allocator's peak; CPU: the process's peak resident set) holds that trainer only (models, EMA, optimiser states,
data). The step with R1 and the same step with `r1_weight` 0 alternate in interleaved rounds; R1's share of the step
is 1 - (without) / (with).

    python benchmarks/train_step.py                        # CPU: hit-b-256, its D step, the two tokenizers, batch 1
    python benchmarks/train_step.py --presets hit-b-256 hit-b-1024 --batch-size 8 --repeats 5   # a GPU
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import tempfile

import torch

from common import (base_parser, count_flops, format_table, load_average, machine, peak_memory_gb, setup,
                    time_calls, write_json)

from vqhit import HiTGenerator, list_presets
from vqhit.losses import d_logistic_loss, g_nonsaturating_loss, r1_penalty
from vqhit.models.discriminator import Discriminator
from vqhit.precision import autocast


def build(name: str, checkpoint_mlp: bool, channel_multiplier: int | None, device, max_channels: int = 512):
    G = HiTGenerator.from_preset(name, checkpoint_mlp=checkpoint_mlp).to(device).train()
    r = G.config.resolution
    # The paper's D: channel multiplier 2 for its face models (256, 1024), 1 for ImageNet 128.
    D = Discriminator(r, channel_multiplier or (1 if r <= 128 else 2), max_channels=max_channels).to(device).train()
    return G, D


def make_step(G, D, batch: int, precision: str, device):
    """One GAN step of G and D as a function; each call returns its (G loss, D loss), detached, on the device."""
    opt_g = torch.optim.Adam(G.parameters(), lr=5e-5, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=5e-5, betas=(0.0, 0.99))
    r = G.config.resolution
    real = torch.rand(batch, 3, r, r, device=device) * 2 - 1

    def step():
        z = torch.randn(batch, G.config.latent_dim, device=device)
        with autocast(precision, device):
            fake = G(z)
        D.requires_grad_(False)
        with autocast(precision, device):
            g_loss = g_nonsaturating_loss(D(fake).float())
        D.requires_grad_(True)
        g_loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        fake = fake.detach()
        r1, real_logits = r1_penalty(D, real, weight=10.0, return_logits=True)  # fp32; its logits serve the loss
        with autocast(precision, device):
            fake_logits = D(fake)
        d_loss = d_logistic_loss(real_logits.float(), fake_logits.float()) + r1
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return g_loss.detach(), d_loss.detach()

    return step


def make_d_steps(D, resolution: int, batch: int, precision: str, device) -> dict:
    """The discriminator's step with R1, as the trainer runs it (D on the reals once) and as it would run with D on
    the reals twice; same D, same images, same losses."""
    opt_d = torch.optim.Adam(D.parameters(), lr=5e-5, betas=(0.0, 0.99))
    real = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    fake = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1

    def update(d_loss):
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    def once():
        r1, real_logits = r1_penalty(D, real, weight=10.0, return_logits=True)
        with autocast(precision, device):
            fake_logits = D(fake)
        update(d_logistic_loss(real_logits.float(), fake_logits.float()) + r1)

    def twice():
        with autocast(precision, device):
            real_logits, fake_logits = D(real), D(fake)
        update(d_logistic_loss(real_logits.float(), fake_logits.float()) + r1_penalty(D, real, weight=10.0))

    return {"reals once": once, "reals twice": twice}


def g_step_activation_bytes(name: str, batch: int, checkpoint_mlp: bool, channel_multiplier: int | None) -> int:
    """Bytes autograd saves for the backward of the G step (G forward + D forward), counted on meta tensors."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.device("meta"):
        G, D = build(name, checkpoint_mlp, channel_multiplier, "meta")
        D.requires_grad_(False)
        z = torch.randn(batch, G.config.latent_dim)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            D(G(z))
    return total


TOKENIZER = "vqhit-b-f16-1024"
TOKENIZER_DECODERS = {"hit": {}, "conv": {"decoder": "conv"}}  # conv = the vqgan-f16-1024 preset


def trainer_step(task: str, model: str, model_options: dict, batch: int, precision: str, threads: int | None,
                 repeats: int, min_repeat_s: float, count_flops_too: bool = False) -> dict:
    """Times `Trainer.train_step` of `model`'s recipe (`task` "gan" or "vqhit"), with R1 and without, in interleaved
    rounds. The perceptual VGG, if the recipe has one, has random weights. With `count_flops_too`, the warm-up of the
    step with R1 runs under a FLOP counter and the result holds `flops` (per step) and the attention kernels."""
    # Imported here, not at the top: the GPU check imports this module on machines that may lack Accelerate.
    from vqhit.train_config import resolve_config
    from vqhit.training import Trainer

    counted, given = {}, {}
    if threads:
        torch.set_num_threads(threads)
        given["cpu_threads"] = threads  # else a CPU recipe's own thread count would replace it
    with tempfile.TemporaryDirectory() as output_dir:
        config = resolve_config({"model": model, "model_options": model_options,
                                 "batch_size": batch, "num_workers": 0, "max_images": batch, "num_samples": batch,
                                 "perceptual_pretrained": False, "precision": precision,
                                 "output_dir": output_dir, **given}, task)
        trainer = Trainer(config, task)
        try:
            device = trainer.accelerator.device
            net = trainer.accelerator.unwrap_model(trainer.model)
            real = torch.rand(batch, 3, net.config.resolution, net.config.resolution, device=device) * 2 - 1
            config_r1 = trainer.config.r1_weight

            def without_r1():
                trainer.config.r1_weight = 0.0
                try:
                    trainer.train_step(real)
                finally:
                    trainer.config.r1_weight = config_r1

            def counted_with_r1():
                counted["flops"], counted["sdpa"] = count_flops(lambda: trainer.train_step(real))

            timings = time_calls({"with R1": lambda: trainer.train_step(real), "without R1": without_r1}, device,
                                 repeats, min_repeat_s, {"with R1": counted_with_r1} if count_flops_too else None)
        finally:
            trainer.folder.unlock()
    peak = peak_memory_gb(device)
    if peak is None:  # CPU: the peak resident set of this process (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"timings": timings, "peak_gb": peak, "peak_kind": "allocator" if device.type == "cuda" else "process RSS",
            "params": net.num_parameters(),
            "decoder_params": net.num_parameters(net.decoder) if hasattr(net, "decoder") else None,
            "threads": torch.get_num_threads(), "bcr_weight": config.bcr_weight, **counted}


def tokenizer_step(decoder: str, batch: int, precision: str, threads: int | None, repeats: int,
                   min_repeat_s: float) -> dict:
    """`trainer_step` of the tokenizer recipe with `decoder`; run in a fresh process so that its peak memory is this
    trainer's alone."""
    result = trainer_step("vqhit", TOKENIZER, TOKENIZER_DECODERS[decoder], batch, precision, threads, repeats,
                          min_repeat_s)
    return {key: result[key] for key in ("timings", "peak_gb", "peak_kind", "decoder_params", "threads")}


def main(argv=None) -> dict:
    parser = base_parser("train_step", __doc__)
    parser.add_argument("--presets", nargs="*", default=None, choices=list_presets("generator"),
                        help="presets to time (default: hit-b-256 on CPU, hit-b-256 hit-b-1024 on CUDA; none: skip)")
    parser.add_argument("--memory-presets", nargs="*", default=["hit-b-256", "hit-b-1024"],
                        choices=list_presets("generator"), help="presets whose activation bytes are counted")
    parser.add_argument("--batch-size", type=int, default=None, help="default 1 on CPU, 8 on CUDA")
    parser.add_argument("--checkpoint-mlp", choices=("off", "on", "both"), default="both")
    parser.add_argument("--channel-multiplier", type=int, default=None,
                        help="discriminator channel multiplier (default: 2 at 256 and above, 1 below)")
    parser.add_argument("--d-step-presets", nargs="*", default=["hit-b-256"], choices=list_presets("generator"),
                        help="time the D step with the reals run once against twice, with the D of these presets "
                             "(none: skip)")
    parser.add_argument("--tokenizer-decoders", nargs="*", default=list(TOKENIZER_DECODERS),
                        choices=list(TOKENIZER_DECODERS),
                        help=f"time {TOKENIZER}'s training step with these decoders (none: skip the tokenizer)")
    parser.set_defaults(repeats=None)
    args = parser.parse_args(argv)
    device = setup(args)
    on_gpu = device.type == "cuda"
    presets = args.presets if args.presets is not None else (["hit-b-256", "hit-b-1024"] if on_gpu else ["hit-b-256"])
    batch = args.batch_size or (8 if on_gpu else 1)
    args.repeats = args.repeats or (3 if on_gpu else 1)  # a hit-b-256 step takes minutes on a small CPU
    checkpoints = {"off": [False], "on": [True], "both": [False, True]}[args.checkpoint_mlp]
    info = machine(device, args)
    print(f"{info['device_name']} | torch {info['torch']} | {args.precision} | {info['torch_threads']} threads")

    memory = []
    for name in args.memory_presets:
        for ckpt in checkpoints:
            saved = g_step_activation_bytes(name, batch, ckpt, args.channel_multiplier)
            memory.append({"preset": name, "batch": batch, "checkpoint_mlp": ckpt, "activations_gb": saved / 2**30})
    # One configuration at a time (not interleaved like the inference benchmarks): its peak memory must hold
    # only its own models, gradients and optimiser states, read after the timed steps (Adam's state appears
    # in the first step).
    rows = []
    for name in presets:
        for ckpt in checkpoints:
            torch.manual_seed(0)
            G, D = build(name, ckpt, args.channel_multiplier, device)
            step = make_step(G, D, batch, args.precision, device)
            t = time_calls({(name, ckpt): step}, device, args.repeats, args.min_repeat_s)[name, ckpt]
            rows.append({"preset": name, "batch": batch, "checkpoint_mlp": ckpt, **t})
            if "seconds" in t:
                rows[-1].update(ms_per_step=1e3 * t["seconds"], images_per_s=batch / t["seconds"],
                                peak_gb=peak_memory_gb(device))
            G = D = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    d_rows = []
    for name in args.d_step_presets:
        torch.manual_seed(0)
        G, D = build(name, False, args.channel_multiplier, device)
        steps = make_d_steps(D, G.config.resolution, batch, args.precision, device)
        G = None
        t = time_calls(steps, device, max(args.repeats, 3), args.min_repeat_s)
        once, twice = t["reals once"], t["reals twice"]
        d_rows.append({"preset": name, "batch": batch, "once": once, "twice": twice,
                       "s_once": once["median_seconds"], "s_twice": twice["median_seconds"],
                       "gain": twice["median_seconds"] / once["median_seconds"],
                       "load": f"{min(once['load_1m']):.1f}-{max(once['load_1m']):.1f}"})
        D = steps = None

    tokenizer_rows = []
    spawn = multiprocessing.get_context("spawn")
    for decoder in args.tokenizer_decoders:
        load = load_average()
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            result = pool.submit(tokenizer_step, decoder, batch, args.precision, args.threads, args.repeats,
                                 args.min_repeat_s).result()
        with_r1, without_r1 = result["timings"]["with R1"], result["timings"]["without R1"]
        row = {"model": TOKENIZER if decoder == "hit" else f"{TOKENIZER} decoder=conv", "decoder": decoder,
               "batch": batch, "decoder_params": result["decoder_params"], "threads": result["threads"],
               "peak_gb": result["peak_gb"], "peak_kind": result["peak_kind"], "load_start": load,
               "with_r1": with_r1, "without_r1": without_r1}
        if "median_seconds" in with_r1 and "median_seconds" in without_r1:
            row.update(s_per_step=with_r1["median_seconds"], images_per_s=batch / with_r1["median_seconds"],
                       s_without_r1=without_r1["median_seconds"],
                       r1_share=1 - without_r1["median_seconds"] / with_r1["median_seconds"],
                       load=f"{min(with_r1['load_1m']):.1f}-{max(with_r1['load_1m']):.1f}")
        tokenizer_rows.append(row)

    if memory:
        print("\nG-step activations saved for backward (counted on the meta device):")
        print(format_table(memory, [("preset", "preset"), ("batch", "batch"), ("checkpoint_mlp", "checkpoint_mlp"),
                                    ("activations GB", "activations_gb")]))
    if rows:
        print("\nFull GAN training step (G step + D step with R1):")
        print(format_table(rows, [("preset", "preset"), ("batch", "batch"), ("checkpoint_mlp", "checkpoint_mlp"),
                                  ("ms/step", "ms_per_step"), ("img/s", "images_per_s"), ("peak GB", "peak_gb"),
                                  ("error", "error")]))
    if d_rows:
        print("\nD step with R1: the reals run once (R1's forward gives the loss's logits) against twice (median):")
        print(format_table(d_rows, [("preset", "preset"), ("batch", "batch"), ("s once", "s_once"),
                                    ("s twice", "s_twice"), ("twice / once", "gain"), ("load 1m", "load")]))
    if tokenizer_rows:
        print(f"\nTokenizer training step (Trainer.train_step, {TOKENIZER}'s recipe; median of the rounds):")
        print(format_table(tokenizer_rows, [
            ("decoder", "decoder"), ("decoder params", "decoder_params"), ("batch", "batch"), ("threads", "threads"),
            ("s/step", "s_per_step"), ("img/s", "images_per_s"), ("s/step without R1", "s_without_r1"),
            ("R1 share", "r1_share"), ("peak GB", "peak_gb"), ("peak of", "peak_kind"), ("load 1m", "load")]))
    write_json(args.json, info, batch_size=batch, results=rows, activations=memory, d_step=d_rows,
               tokenizer=tokenizer_rows)
    return {"results": rows, "activations": memory, "d_step": d_rows, "tokenizer": tokenizer_rows}


if __name__ == "__main__":
    main()
