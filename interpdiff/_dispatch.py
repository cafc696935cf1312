"""Backend choice for the ops that have a Triton kernel in ``kernels/``.

``backend="auto"`` picks Triton for CUDA tensors (when Triton imports) and the torch
reference otherwise; ``"torch"`` always takes the reference; ``"triton"`` forces the kernel and
raises a clear error when it cannot run (a CPU tensor without ``TRITON_INTERPRET=1``, or no
Triton installed).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, tensor: torch.Tensor, op: str) -> bool:
    """True when ``op`` should run its Triton kernel for ``tensor`` under ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "auto":
        return tensor.is_cuda and triton_available() and not interpret
    # forced
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' was forced but the triton package is not installed")
    if not tensor.is_cuda and not interpret:
        raise RuntimeError(
            f"{op}: backend='triton' was forced on a {tensor.device.type} tensor; Triton runs on CUDA "
            "tensors, or on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        )
    return True
