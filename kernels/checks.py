"""What the kernels' argument checks share: the float dtypes they accept, how a tensor is described in an
error, and the backend choice of the ops that have one Triton kernel and one PyTorch reference."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OP_BACKENDS = ("torch", "triton", "auto")  # rms_norm, rotary_, silu_and_mul, paged_decode_attention


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def check_op_backend(backend: str) -> None:
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend: expected one of {OP_BACKENDS}, got {backend!r}")


def use_triton(backend: str, t: torch.Tensor) -> bool:
    """"triton", or "auto" on CUDA tensors; else the PyTorch reference."""
    return backend == "triton" or (backend == "auto" and t.is_cuda)
