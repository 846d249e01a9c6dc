"""Exponential moving average of a model: the generator/decoder that is sampled, evaluated and exported."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's parameters *and* floating-point buffers (BatchNorm statistics).

    Before `start_step` the average is a copy of the model; from then on avg <- decay * avg + (1 - decay) * x.
    Integer buffers (BatchNorm's batch counter) are copied. Under DDP every rank holds the same model after each
    step (gradients are averaged, BatchNorm statistics too: see vqhit.distributed), so every rank's EMA is the same.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start_step: int = 10):
        self.decay, self.start_step = decay, start_step
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = None  # (source model, [(average, source) float tensors], [(copy, source) int tensors])

    def _tensors(self, model: nn.Module):
        """Matching tensors of the average and the model, collected once: the first update runs after the model
        has been placed on its device, and training only changes tensors in place."""
        if self._pairs is None or self._pairs[0] is not model:
            ours, theirs = self.model.state_dict(), model.state_dict()
            pairs = [(ours[k], theirs[k].detach()) for k in ours]
            self._pairs = (model, [p for p in pairs if p[0].is_floating_point()],
                           [p for p in pairs if not p[0].is_floating_point()])
        return self._pairs[1], self._pairs[2]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        floats, others = self._tensors(model)
        for a, b in others:
            a.copy_(b)
        if step < self.start_step:
            torch._foreach_copy_([a for a, _ in floats], [b for _, b in floats])
        else:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
