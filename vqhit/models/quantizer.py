"""Vector quantization for the VQ-HiT tokenizer.

Every token vector z of the encoder (channels-last, (B, h, w, code_dim)) is replaced by its nearest
codebook entry e. The gradient skips the non-differentiable lookup (straight-through estimator), and two
losses pull codes and encoder outputs together:

    loss = ||sg[z] - e||^2  +  beta * ||z - sg[e]||^2
           codebook loss        commitment loss (beta on the encoder side, as van den Oord et al.)

taming-transformers' `VectorQuantizer` puts beta on the codebook term instead; this one does not.
With the defaults the parameter layout is taming's (one `embedding.weight` of shape (codebook_size, code_dim)),
so a taming VQGAN codebook loads directly.

Options (all off by default):
- `l2_normalize`: cosine codes. z and the codes are unit-normalised before the search and the losses,
  so the distance is 2 - 2cos (ViT-VQGAN).
- `lookup_dim`: factorised codes. z is projected to a small space (e.g. 8 or 32 dims) for the search,
  the codebook lives there, and the chosen code is projected back to code_dim (ViT-VQGAN, LlamaGen).
- `restart_dead_codes`: a code that no token chose for `dead_code_steps` training forwards is
  re-initialised from a random recent encoder output (kept in a ring buffer). A codebook whose weight is
  frozen (`requires_grad=False`) is never restarted: its token ids must stay valid.
- `entropy_loss_weight`: the codebook entropy loss of MAGVIT / LlamaGen, added to `loss`. With the soft
  assignment p(k | z) = softmax(-||z - e_k||^2 / entropy_temperature) it is
      mean_z H(p(. | z))  -  H(mean_z p(. | z))
  low when each token is sure of its code (first term) and the batch spreads over many codes (second term),
  which fights codebook collapse. It sees the codes through the soft assignment, so its gradient reaches
  both the encoder side and the codebook. The batch average is per process (as MAGVIT and LlamaGen).

Under torch.distributed (DDP with `broadcast_buffers=False`, see vqhit.distributed) every process sees
its own images and the statistics are made global where they matter: the usage histogram stays per
process and `usage_stats()` sums it; the dead-code clocks advance on counts summed over processes; the
restart ring buffer gathers every process's share of recent encoder outputs (so it is the same everywhere,
and a checkpoint written by rank 0 holds all of it); rank 0 draws the candidates and every process writes
the same new codes.

Usage statistics (a code histogram) are accumulated by every forward, training and eval alike, until
`reset_usage()`. Codebook collapse is the first thing tokenizer users look for, so these numbers are
meant to be logged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..metrics import histogram_usage


@dataclass
class QuantizerOutput:
    quantized: Tensor        # (B, h, w, code_dim), straight-through: the gradient flows to the input z
    indices: Tensor          # (B, h, w) int64
    loss: Tensor             # codebook_loss + beta * commitment_loss (+ entropy_loss_weight * entropy_loss)
    codebook_loss: Tensor    # mean ||sg[z] - e||^2: moves the codes
    commitment_loss: Tensor  # mean ||z - sg[e]||^2: moves the encoder
    entropy_loss: Tensor | None = None  # unweighted entropy loss (None when entropy_loss_weight is 0)


def check_options(codebook_size: int, code_dim: int, beta: float, lookup_dim: int | None = None,
                  restart_dead_codes: bool = False, dead_code_steps: int = 500, restart_buffer_size: int = 4096,
                  entropy_loss_weight: float = 0.0, entropy_temperature: float = 0.01) -> None:
    """ValueError for a VectorQuantizer option that cannot work (VQHiTConfig checks its keys with it too).
    Written as `not (x >= y)` where NaN must fail."""
    if codebook_size < 1 or code_dim < 1:
        raise ValueError(f"codebook_size and code_dim must be positive, got {codebook_size} and {code_dim}")
    if not (beta >= 0) or math.isinf(beta):
        raise ValueError(f"beta (the commitment loss weight) must be a finite number >= 0, got {beta}")
    if lookup_dim is not None and lookup_dim < 1:
        raise ValueError(f"lookup_dim must be a positive int or None, got {lookup_dim}")
    if restart_dead_codes and (dead_code_steps < 1 or restart_buffer_size < 1):
        raise ValueError("dead_code_steps and restart_buffer_size must be >= 1 when restart_dead_codes is on, "
                         f"got {dead_code_steps} and {restart_buffer_size}")
    if not (entropy_loss_weight >= 0 and entropy_temperature > 0) or math.isinf(entropy_loss_weight):
        raise ValueError(f"entropy_loss_weight must be finite and >= 0 and entropy_temperature > 0, got "
                         f"{entropy_loss_weight} and {entropy_temperature}")


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through estimator. Input and output are channels-last.

    Args:
        codebook_size: number of codes K.
        code_dim: width of the vectors coming in and going out.
        beta: weight of the commitment loss (the encoder-side term).
        l2_normalize: search and losses on unit vectors (cosine similarity).
        lookup_dim: if set, search in this many dims through Linear(code_dim -> lookup_dim) and map the
            chosen code back with Linear(lookup_dim -> code_dim). The losses live in the lookup space.
        restart_dead_codes: re-initialise codes unused for `dead_code_steps` training forwards.
        dead_code_steps: how many training forwards a code may go unchosen before it is restarted.
        restart_buffer_size: how many recent encoder outputs (of all processes together) to keep as restart
            candidates; each training forward contributes restart_buffer_size / world_size rows per process.
        entropy_loss_weight: weight of the codebook entropy loss in `loss` (0: off, not even computed).
        entropy_temperature: temperature of the soft assignment of that loss (0.01, as LlamaGen; it divides
            squared distances, so it suits l2-normalised or low-dimensional codes, whose distances are O(1)).

    With `restart_dead_codes` under torch.distributed every training-mode forward all-reduces the
    per-code hits (K integers): run training-mode forwards on every process together, and sample or
    evaluate in eval mode. A restarted code keeps its optimizer state (Adam moments), as in most codebases.
    """

    def __init__(self, codebook_size: int = 1024, code_dim: int = 256, beta: float = 0.25,
                 l2_normalize: bool = False, lookup_dim: int | None = None, restart_dead_codes: bool = False,
                 dead_code_steps: int = 500, restart_buffer_size: int = 4096, entropy_loss_weight: float = 0.0,
                 entropy_temperature: float = 0.01):
        super().__init__()
        check_options(codebook_size, code_dim, beta, lookup_dim, restart_dead_codes, dead_code_steps,
                      restart_buffer_size, entropy_loss_weight, entropy_temperature)
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.entropy_loss_weight, self.entropy_temperature = entropy_loss_weight, entropy_temperature
        self.l2_normalize, self.lookup_dim = l2_normalize, lookup_dim
        self.restart_dead_codes, self.dead_code_steps = restart_dead_codes, dead_code_steps
        search_dim = lookup_dim or code_dim

        self.embedding = nn.Embedding(codebook_size, search_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # taming's init
        self.in_proj = nn.Linear(code_dim, lookup_dim) if lookup_dim else None
        self.out_proj = nn.Linear(lookup_dim, code_dim) if lookup_dim else None

        # The usage histogram is a logging window: not saved. Without restarts the state dict is taming's
        # single `embedding.weight`.
        self.register_buffer("code_counts", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        if restart_dead_codes:
            # Saved with the model: a resumed run must restart the same codes at the same step as an
            # uninterrupted one.
            self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))
            self.register_buffer("recent_inputs", torch.zeros(restart_buffer_size, search_dim))
            self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))  # rows holding real data
            self.register_buffer("recent_next", torch.zeros((), dtype=torch.long))    # ring-buffer write position

    # ------------------------------------------------------------------ search space
    def _to_search_space(self, z: Tensor) -> Tensor:
        """(..., code_dim) -> (..., search_dim) in fp32 (fp64 stays fp64): the projection (if any), in its weights'
        dtype, before normalisation."""
        if self.in_proj is not None:
            z = self.in_proj(z.to(self.in_proj.weight.dtype))
        return self._float(z)

    def _codebook(self) -> Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def _check_input(self, z: Tensor) -> None:
        if z.ndim < 2 or z.shape[-1] != self.code_dim:
            raise ValueError(f"expected channels-last z of shape (B, h, w, {self.code_dim}), got {tuple(z.shape)}; "
                             "permute an NCHW map with z.permute(0, 2, 3, 1)")

    @staticmethod
    def _float(z: Tensor) -> Tensor:
        # The search and the losses run in fp32 (fp64 stays fp64): bf16 distances pick wrong codes.
        return z if z.dtype in (torch.float32, torch.float64) else z.float()

    @staticmethod
    def _distances(flat: Tensor, codebook: Tensor) -> Tensor:
        """Squared distances (N, K) of the rows of flat (N, D) to the codes: ||z||^2 - 2 z.e + ||e||^2, by matmul."""
        codebook = codebook.to(flat.dtype)
        return flat.square().sum(1, keepdim=True) - 2.0 * flat @ codebook.t() + codebook.square().sum(1)[None, :]

    @staticmethod
    def _gather(codebook: Tensor, indices: Tensor) -> Tensor:
        """The codes of `indices` (any shape), (*indices.shape, dim): codebook[indices], by index_select.

        Its backward (index_add_) adds each code's gradients in token order, so on CPU the codebook's gradient has the
        same bits at any thread count. codebook[indices] gives the same values, but its backward, on more than one
        thread, adds with atomics in no fixed order; F.embedding's backward is reproducible too, but slower
        (benchmarks/README.md)."""
        return codebook.index_select(0, indices.reshape(-1)).view(*indices.shape, codebook.shape[-1])

    def _nearest(self, flat: Tensor, codebook: Tensor) -> Tensor:
        """Index of the nearest code of each row of flat (N, D)."""
        with torch.no_grad():
            return self._distances(flat, codebook).argmin(dim=1)

    def _entropy_loss(self, flat: Tensor, codebook: Tensor) -> Tensor:
        """mean per-token entropy - entropy of the batch-mean assignment, both of softmax(-d^2 / T) over codes."""
        logits = -self._distances(flat, codebook) / self.entropy_temperature
        probs, log_probs = logits.softmax(dim=1), logits.log_softmax(dim=1)
        per_token_entropy = -(probs * log_probs).sum(1).mean()
        mean_probs = probs.mean(0)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        return per_token_entropy - batch_entropy

    def _codebook_frozen(self) -> bool:
        return not self.embedding.weight.requires_grad

    # ------------------------------------------------------------------ public API
    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_input(z)
        with torch.autocast(z.device.type, enabled=False):
            restarting = self.training and self.restart_dead_codes and not self._codebook_frozen()
            if restarting:
                # Before the lookup: the codebook must not change after autograd has used it.
                self._restart_dead_codes()
            z_search = self._to_search_space(z)
            if self.l2_normalize:
                z_search = F.normalize(z_search, dim=-1)
            flat = z_search.reshape(-1, z_search.shape[-1])
            codebook = self._codebook()
            indices = self._nearest(flat, codebook)
            codes = self._gather(codebook, indices).to(flat.dtype)

            codebook_loss = F.mse_loss(codes, flat.detach())
            commitment_loss = F.mse_loss(flat, codes.detach())
            loss = codebook_loss + self.beta * commitment_loss
            entropy_loss = None
            if self.entropy_loss_weight > 0:
                entropy_loss = self._entropy_loss(flat, codebook)
                loss = loss + self.entropy_loss_weight * entropy_loss
            quantized = flat + (codes - flat).detach()  # straight-through: forward = codes, backward = identity
            # Back in the model's dtype (a .half() or bf16 model), for the projection and the decoder after it; a
            # float32 model under autocast keeps float32 (autocast casts where it applies).
            quantized = quantized.view(z_search.shape).to(self.embedding.weight.dtype)
            if self.out_proj is not None:
                quantized = self.out_proj(quantized)

        with torch.no_grad():
            self.code_counts += torch.bincount(indices, minlength=self.codebook_size)
            if restarting:
                self._track_dead_codes(indices, z_search.detach().reshape(-1, z_search.shape[-1]))
        return QuantizerOutput(quantized=quantized, indices=indices.view(z.shape[:-1]), loss=loss,
                               codebook_loss=codebook_loss, commitment_loss=commitment_loss,
                               entropy_loss=entropy_loss)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Nearest-code indices (B, h, w) int64 of z (B, h, w, code_dim). No side effects (usage not counted)."""
        self._check_input(z)
        with torch.autocast(z.device.type, enabled=False):
            z_search = self._to_search_space(z)
            if self.l2_normalize:
                z_search = F.normalize(z_search, dim=-1)
            return self._nearest(z_search.reshape(-1, z_search.shape[-1]), self._codebook()).view(z.shape[:-1])

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors (B, h, w, code_dim) of indices (B, h, w): taming's `get_codebook_entry`, channels-last."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dtype.is_complex:
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}; use indices.long()")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, "
                             f"{int(indices.max())}]")
        return self.code_vectors(indices.long())

    def code_vectors(self, indices: Tensor) -> Tensor:
        """`lookup` without its checks, which read the indices' values: int64 indices in [0, codebook_size) ->
        code vectors (B, h, w, code_dim). What the exported decoder graph computes (vqhit.export)."""
        codes = self._gather(self._codebook(), indices)
        return self.out_proj(codes) if self.out_proj is not None else codes

    def reset_usage(self) -> None:
        """Zero the usage histogram (e.g. at the start of an evaluation or a logging window)."""
        self.code_counts.zero_()

    @torch.no_grad()
    def usage_stats(self) -> dict:
        """Usage of the codebook since the last `reset_usage()`, over all processes.

        Returns {"usage": fraction of codes chosen at least once (0..1), "perplexity": exp(entropy of the
        code histogram) (0.0 if nothing was counted), "codes_used": int}. Under torch.distributed the
        histograms are summed first, so this is a collective: call it on every process.
        """
        counts = distributed.all_reduce_sum(self.code_counts.clone())
        if counts.sum() == 0:
            return {"usage": 0.0, "perplexity": 0.0, "codes_used": 0}
        return {**histogram_usage(counts), "codes_used": int((counts > 0).sum())}

    # ------------------------------------------------------------------ dead-code restart
    def _track_dead_codes(self, indices: Tensor, z_search: Tensor) -> None:
        """Advance the per-code clocks (on counts summed over processes) and remember recent encoder outputs.

        Each process samples its share of the ring buffer from its own tokens and the shares are gathered, so the
        buffer holds every process's recent outputs and is the same on every process: the checkpoint (which
        Accelerate writes from rank 0) then resumes every process exactly.
        """
        hits = distributed.all_reduce_sum(torch.bincount(indices, minlength=self.codebook_size))
        self.steps_since_used += 1
        self.steps_since_used[hits > 0] = 0  # a code chosen on any process is alive on all

        capacity = self.recent_inputs.shape[0]
        share = min(z_search.shape[0], max(1, capacity // distributed.world_size()))
        sample = z_search[torch.randperm(z_search.shape[0], device=z_search.device)[:share]]
        sample = distributed.all_gather_cat(sample.to(self.recent_inputs.dtype))[-capacity:]
        take = sample.shape[0]
        rows = (int(self.recent_next) + torch.arange(take, device=sample.device)) % capacity
        self.recent_inputs[rows] = sample
        self.recent_next.fill_((int(self.recent_next) + take) % capacity)
        self.recent_filled.fill_(min(int(self.recent_filled) + take, capacity))

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        """Re-seed dead codes from the ring buffer (every process's recent outputs), identically on every process."""
        dead = (self.steps_since_used >= self.dead_code_steps).nonzero().squeeze(1)
        # Clocks and buffer are the same on every process, so every process takes these branches together.
        if dead.numel() == 0 or int(self.recent_filled) == 0:
            return
        pool = self.recent_inputs[:int(self.recent_filled)]
        if pool.shape[0] >= dead.numel():  # distinct candidates when there are enough
            pick = torch.randperm(pool.shape[0], device=pool.device)[:dead.numel()]
        else:
            pick = torch.randint(pool.shape[0], (dead.numel(),), device=pool.device)
        distributed.broadcast_(pick, src=0)  # rank 0's draw for everyone (each process has its own RNG stream)
        self.embedding.weight[dead] = pool[pick].to(self.embedding.weight.dtype)
        self.steps_since_used[dead] = 0
