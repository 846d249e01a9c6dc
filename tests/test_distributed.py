"""vqhit.distributed and the statistics that depend on it, in 2 real processes (gloo, CPU).

Each rank feeds *different* data through a quantizer wrapped in DDP by Accelerate with `ddp_kwargs()`, as
training does, and the tests compare what every rank reports with what the union of both ranks' data gives.
The same run with Accelerate's default `broadcast_buffers=True` shows what the buffer policy prevents.
Both runs share the two processes: starting them is most of the cost.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vqhit import distributed
from vqhit.losses import LeCam
from vqhit.models.quantizer import VectorQuantizer

STEPS = 3
CLUSTER = 3.0  # rank 0's tokens sit around (+3, +3), rank 1's around (-3, -3)


class TinyTokenizer(nn.Module):
    """A trainable 'encoder' (Linear, identity at start) in front of the quantizer: DDP needs a trainable
    parameter even when the codebook is frozen."""

    def __init__(self, quantizer: VectorQuantizer):
        super().__init__()
        self.proj = nn.Linear(quantizer.code_dim, quantizer.code_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(quantizer.code_dim))
            self.proj.bias.zero_()
        self.quantize = quantizer

    def forward(self, z):
        q = self.quantize(self.proj(z))
        return q.loss, q.indices  # codebook + commitment: small steps that keep the tokens where they are


def usage_quantizer() -> VectorQuantizer:
    # Restarts on but far away (dead_code_steps): the ring buffer exists, as in a real run, without restarting.
    vq = VectorQuantizer(64, 2, restart_dead_codes=True, dead_code_steps=1000, restart_buffer_size=32)
    vq.embedding.weight.data.copy_(torch.randn(64, 2, generator=torch.Generator().manual_seed(7)) * 2)
    return vq


def restart_codebook() -> torch.Tensor:
    """Code 0 on rank 0's cluster, code 1 on rank 1's, codes 2..15 far from all data (dead after 2 steps)."""
    far = [[50.0 + i, 50.0] for i in range(14)]
    return torch.tensor([[CLUSTER, CLUSTER], [-CLUSTER, -CLUSTER]] + far)


def restart_quantizer() -> VectorQuantizer:
    vq = VectorQuantizer(16, 2, restart_dead_codes=True, dead_code_steps=2, restart_buffer_size=32)
    vq.embedding.weight.data.copy_(restart_codebook())
    return vq


def rank_tokens(rank: int, step: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    centre = CLUSTER if rank == 0 else -CLUSTER
    return torch.randn(1, 4, 4, 2, generator=g) * spread + centre


def train(accelerator, quantizer, spread: float):
    """STEPS DDP training steps on this rank's own tokens; returns (the unwrapped quantizer, indices per step)."""
    model = TinyTokenizer(quantizer)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    indices = []
    for step in range(STEPS):
        loss, idx = model(rank_tokens(accelerator.process_index, step, spread))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        indices.append(idx.flatten())
    return accelerator.unwrap_model(model).quantize, torch.cat(indices)


def _worker(rank: int, init_file: str, out_dir: str):
    # What a launcher sets; the process group itself comes from the file below (no port to collide on).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", ACCELERATE_USE_CPU="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        torch.manual_seed(1000 + rank)  # different restart draws on each rank: rank 0's must win
        result = {}
        # vqhit's policy, then (same processes, to pay the start-up once) Accelerate's default for comparison.
        for policy, kwargs in (("vqhit", distributed.ddp_kwargs()), ("default", [DistributedDataParallelKwargs()])):
            accelerator = Accelerator(cpu=True, kwargs_handlers=kwargs)
            vq, indices = train(accelerator, usage_quantizer(), spread=2.0)
            out = {"usage": vq.usage_stats(), "usage_indices": indices}
            vq, _ = train(accelerator, restart_quantizer(), spread=0.3)
            out["restart_codebook"] = vq.embedding.weight.detach().clone()
            out["restart_state"] = {k: v.clone() for k, v in vq.state_dict().items()}
            frozen = restart_quantizer()
            frozen.embedding.weight.requires_grad_(False)
            vq, _ = train(accelerator, frozen, spread=0.3)
            out["frozen_codebook"] = vq.embedding.weight.detach().clone()
            result[policy] = out
        result.update(_helpers(rank))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _helpers(rank: int) -> dict:
    out = {"rank": distributed.rank(), "world_size": distributed.world_size(),
           "is_distributed": distributed.is_distributed()}
    dist.barrier()
    out["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1, 10 * (rank + 1)]))
    out["mean"] = distributed.all_reduce_mean(torch.tensor([float(rank), 4.0 * rank]))
    out["gathered"] = distributed.all_gather_cat(torch.full((2 + rank, 3), float(rank)))  # 2 rows, then 3
    out["broadcast"] = distributed.broadcast_(torch.tensor([rank * 1.0 + 5.0]), src=1)
    out["scalars"] = distributed.reduce_scalars({"a": float(rank), "b": torch.tensor(2.0 * rank + 1)})

    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False)).train()
    torch.manual_seed(0)
    bn[0].reset_parameters()  # same weights on both ranks, different data
    bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(rank)) * (1 + rank) + rank)
    out["bn_before"] = (bn[1].running_mean.clone(), bn[1].running_var.clone())
    distributed.average_batchnorm_stats_(bn)
    out["bn_after"] = (bn[1].running_mean.clone(), bn[1].running_var.clone())

    lecam = LeCam(weight=1.0, decay=0.9)
    for step in range(3):
        real = torch.full((4,), 1.0 + rank + step)
        fake = torch.full((4,), -1.0 - 3 * rank)
        lecam.penalty(real, fake)
    out["lecam"] = lecam.state_dict()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 processes reported: the vqhit policy's results at top level, Accelerate's default
    (broadcast_buffers=True) under "default"."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return [{**r, **r.pop("vqhit")} for r in results]


def union_usage(results) -> dict:
    """Usage of the union of both ranks' indices, computed here from the indices themselves."""
    counts = torch.bincount(torch.cat([r["usage_indices"] for r in results]), minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "perplexity": math.exp(float(-(p * p.log()).sum()))}


def near(codes: torch.Tensor, centre: float) -> int:
    return int(((codes - centre).norm(dim=1) < 2.0).sum())


def test_usage_counts_every_rank(ranks):
    expected = union_usage(ranks)
    rank0_only = torch.bincount(ranks[0]["usage_indices"], minlength=64)
    assert expected["codes_used"] > int((rank0_only > 0).sum())  # rank 1 adds codes: merging matters
    for r in ranks:
        assert r["usage"]["codes_used"] == expected["codes_used"]
        assert r["usage"]["usage"] == pytest.approx(expected["codes_used"] / 64)
        assert math.isclose(r["usage"]["perplexity"], expected["perplexity"], rel_tol=1e-9)


def test_restart_draws_from_every_rank_and_keeps_codebooks_identical(ranks):
    codebook = ranks[0]["restart_codebook"]
    assert torch.equal(codebook, ranks[1]["restart_codebook"])
    restarted = codebook[2:]
    assert (restarted - restart_codebook()[2:]).abs().min() > 1.0  # every dead code was re-seeded ...
    assert near(restarted, CLUSTER) >= 1 and near(restarted, -CLUSTER) >= 1  # ... from both ranks' tokens
    assert near(restarted, CLUSTER) + near(restarted, -CLUSTER) == 14
    # Code 1 is used on rank 1 only: with per-rank clocks rank 0 would have restarted it.
    assert near(codebook[:1], CLUSTER) == 1 and near(codebook[1:2], -CLUSTER) == 1


def test_restart_state_is_the_same_on_every_rank(ranks):
    """Clocks and ring buffer agree across ranks, so the checkpoint Accelerate writes from rank 0 resumes rank 1
    exactly too; the buffer holds both ranks' tokens."""
    states = [r["restart_state"] for r in ranks]
    assert states[0].keys() == states[1].keys() >= {"steps_since_used", "recent_inputs", "recent_filled"}
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    buffer = states[0]["recent_inputs"][:int(states[0]["recent_filled"])]
    assert near(buffer, CLUSTER) > 0 and near(buffer, -CLUSTER) > 0


def test_frozen_codebook_never_restarts(ranks):
    for r in ranks:
        assert torch.equal(r["frozen_codebook"], restart_codebook())


def test_helpers_across_two_processes(ranks):
    for rank, r in enumerate(ranks):
        assert (r["rank"], r["world_size"], r["is_distributed"]) == (rank, 2, True)
        assert r["sum"].tolist() == [3, 30]
        assert r["mean"].tolist() == [0.5, 2.0]
        assert r["gathered"].tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 3
        assert r["broadcast"].tolist() == [6.0]
        assert r["scalars"] == {"a": 0.5, "b": 2.0}


def test_batchnorm_running_stats_are_averaged(ranks):
    before = [r["bn_before"] for r in ranks]
    assert not torch.allclose(before[0][0], before[1][0])  # the ranks saw different data
    for r in ranks:
        for k in range(2):  # running_mean, running_var
            torch.testing.assert_close(r["bn_after"][k], (before[0][k] + before[1][k]) / 2)


def test_lecam_anchors_agree_across_ranks(ranks):
    assert ranks[0]["lecam"] == ranks[1]["lecam"]
    single = LeCam(weight=1.0, decay=0.9)  # what one process sees when given the mean of both ranks' logits
    for step in range(3):
        single.penalty(torch.full((4,), 1.5 + step), torch.full((4,), -2.5))
    assert ranks[0]["lecam"] == pytest.approx(single.state_dict())


def test_broadcast_buffers_true_would_lose_rank_statistics(ranks):
    """Accelerate's default copies rank 0's buffers over rank 1 before each forward: the
    usage no longer counts rank 1's codes. This is why ddp_kwargs() exists, and it shows that the usage test
    above can fail."""
    default = [r["default"] for r in ranks]
    expected = union_usage(default)
    assert not math.isclose(default[0]["usage"]["perplexity"], expected["perplexity"], rel_tol=1e-6)


# --------------------------------------------------------------------------- one process: no-ops


def test_single_process_helpers_are_no_ops():
    assert not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (0, 1, False)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.all_reduce_mean(t) is t and distributed.broadcast_(t) is t
    gathered = distributed.all_gather_cat(t)
    assert torch.equal(gathered, t) and gathered is not t
    assert distributed.reduce_scalars({"x": torch.tensor(3.0), "y": 2}) == {"x": 3.0, "y": 2.0}
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(0.5)
    distributed.average_batchnorm_stats_(bn)
    assert bn.running_mean.tolist() == [0.5, 0.5]
    (handler,) = distributed.ddp_kwargs()
    assert handler.to_kwargs() == {"broadcast_buffers": False}


def test_helper_errors_name_the_fix():
    with pytest.raises(ValueError, match="floating-point"):
        distributed.all_reduce_mean(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="at least a 1-d"):
        distributed.all_gather_cat(torch.tensor(1.0))
    with pytest.raises(ValueError, match="expected a scalar"):
        distributed.reduce_scalars({"loss": torch.ones(3)})


def test_a_script_leaves_its_process_group_however_it_ends(tmp_path):
    """A process that exits with its gloo group still up can abort (SIGABRT) while the interpreter finalizes, instead
    of exiting with its own status: `cli.run` destroys the group on every way out."""
    from vqhit.cli import run
    from vqhit.errors import UsageError
    from vqhit.preemption import EXIT_PREEMPTED, Preempted

    def mistake(argv):
        raise UsageError("--steps 0 must be at least 1")

    def stopped(argv):
        raise Preempted("stopped at step 3 of 10 by SIGTERM")

    for n, (main, status) in enumerate([(lambda argv: "done", None), (mistake, 2), (stopped, EXIT_PREEMPTED)]):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / f"store{n}"), 1), rank=0, world_size=1)
        try:
            if status is None:
                assert run(main, []) == "done"
            else:
                with pytest.raises(SystemExit) as exited:
                    run(main, [])
                assert exited.value.code == status
            assert not dist.is_initialized()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
