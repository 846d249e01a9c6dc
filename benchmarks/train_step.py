"""One full GAN training step, as `vqhit.training.Trainer.train_step` runs it (R1 every step, no bCR, no EMA):

    G step: fake = G(z); loss = g_nonsaturating(D(fake)) with D frozen; backward; Adam step
    D step: d_logistic(D(real), D(fake.detach())) + r1_penalty(D, real) (fp32); backward; Adam step

Reports images/s, peak memory (CUDA: torch.cuda.max_memory_allocated) and the bytes autograd keeps for the
backward of the G step, with and without `checkpoint_mlp`. Those bytes are counted by running the G step on
the meta device (exact, no compute), so they are given for every preset in `--memory-presets`, even where
the step is too slow to time on CPU.

    python benchmarks/train_step.py                        # CPU: hit-b-256, batch 1, one timed step
    python benchmarks/train_step.py --presets hit-b-256 hit-b-1024 --batch-size 8 --repeats 5   # a GPU
"""
from __future__ import annotations

import torch

from common import autocast, base_parser, format_table, machine, peak_memory_gb, setup, time_calls, write_json

from vqhit import HiTGenerator, list_presets
from vqhit.losses import d_logistic_loss, g_nonsaturating_loss, r1_penalty
from vqhit.models.discriminator import Discriminator


def build(name: str, checkpoint_mlp: bool, channel_multiplier: int | None, device):
    G = HiTGenerator.from_preset(name, checkpoint_mlp=checkpoint_mlp).to(device).train()
    r = G.config.resolution
    # The paper's D: channel multiplier 2 for its face models (256, 1024), 1 for ImageNet 128.
    D = Discriminator(r, channel_multiplier or (1 if r <= 128 else 2)).to(device).train()
    return G, D


def make_step(G, D, batch: int, precision: str, device):
    opt_g = torch.optim.Adam(G.parameters(), lr=5e-5, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=5e-5, betas=(0.0, 0.99))
    r = G.config.resolution
    real = torch.rand(batch, 3, r, r, device=device) * 2 - 1

    def step():
        z = torch.randn(batch, G.config.latent_dim, device=device)
        with autocast(device, precision):
            fake = G(z)
        D.requires_grad_(False)
        with autocast(device, precision):
            g_loss = g_nonsaturating_loss(D(fake).float())
        D.requires_grad_(True)
        g_loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        fake = fake.detach()
        with autocast(device, precision):
            real_logits, fake_logits = D(real), D(fake)
        d_loss = d_logistic_loss(real_logits.float(), fake_logits.float()) + r1_penalty(D, real, weight=10.0)
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    return step


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


def main(argv=None) -> dict:
    parser = base_parser("train_step", __doc__)
    parser.add_argument("--presets", nargs="+", default=None, choices=list_presets("generator"),
                        help="presets to time (default: hit-b-256 on CPU, hit-b-256 hit-b-1024 on CUDA)")
    parser.add_argument("--memory-presets", nargs="+", default=["hit-b-256", "hit-b-1024"],
                        choices=list_presets("generator"), help="presets whose activation bytes are counted")
    parser.add_argument("--batch-size", type=int, default=None, help="default 1 on CPU, 8 on CUDA")
    parser.add_argument("--checkpoint-mlp", choices=("off", "on", "both"), default="both")
    parser.add_argument("--channel-multiplier", type=int, default=None,
                        help="discriminator channel multiplier (default: 2 at 256 and above, 1 below)")
    parser.set_defaults(repeats=None)
    args = parser.parse_args(argv)
    device = setup(args)
    on_gpu = device.type == "cuda"
    presets = args.presets or (["hit-b-256", "hit-b-1024"] if on_gpu else ["hit-b-256"])
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

    print("\nG-step activations saved for backward (counted on the meta device):")
    print(format_table(memory, [("preset", "preset"), ("batch", "batch"), ("checkpoint_mlp", "checkpoint_mlp"),
                                ("activations GB", "activations_gb")]))
    print("\nFull training step (G step + D step with R1):")
    print(format_table(rows, [("preset", "preset"), ("batch", "batch"), ("checkpoint_mlp", "checkpoint_mlp"),
                              ("ms/step", "ms_per_step"), ("img/s", "images_per_s"), ("peak GB", "peak_gb"),
                              ("error", "error")]))
    write_json(args.json, info, batch_size=batch, results=rows, activations=memory)
    return {"results": rows, "activations": memory}


if __name__ == "__main__":
    main()
