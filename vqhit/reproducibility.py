"""Bit-exact training, and what `--deterministic` adds to it.

Without the option, on CPU, a training step of either script gives the same bits every time it runs, on one thread or
several: every operation the models use adds its terms in an order that the thread count fixes, never in the order
the threads happen to finish (the quantizer's codebook gradient included: vqhit.models.quantizer). So the same command
run twice, or stopped and resumed, ends with the same weights. Another thread count splits the sums of matmuls and
convolutions differently, so a run at another thread count ends with other bits.

On a GPU several kernels add with atomics in whatever order the hardware schedules them (cuDNN's convolution
backward, cuBLAS's split reductions, scatter-adds), so two runs drift apart from the first step. `--deterministic`
(`use_deterministic_algorithms`) asks PyTorch for deterministic kernels everywhere, at some cost in speed
(benchmarks/README.md); an operation that has none stops the run with an error naming it instead of running
nondeterministically. On CPU it changes no result, and its cost was within the noise of the benchmark.

Bit-exactness holds for the same number of processes: another number cuts the batches differently.
"""
from __future__ import annotations

import os
import warnings

import torch

# cuBLAS's workspace for reproducible results (NVIDIA's cuBLAS docs, "Results reproducibility"): PyTorch reads it when it
# creates its first cuBLAS handle, so it must be in the environment before the first matmul on a GPU.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def use_deterministic_algorithms() -> None:
    """Deterministic kernels for the rest of this process: PyTorch's deterministic mode (an operation without a
    deterministic kernel raises), cuDNN's deterministic convolutions without autotuning, and cuBLAS's fixed workspace.

    Call it before the first GPU matmul (the trainer calls it before it builds the Accelerator). A
    CUBLAS_WORKSPACE_CONFIG already in the environment is kept (`:16:8` is the other reproducible one).
    """
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():
            warnings.warn("--deterministic: CUDA was already in use in this process, so cuBLAS may keep the workspace "
                          f"it started with; set CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_CONFIG} in the environment "
                          "before starting Python to be sure")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
