"""The validated adapter, in host memory, in the layout the replica's slot pool stacks from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class LoRAWeights:
    uri: str
    name: str
    rank: int
    alpha: float
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA
    modules: tuple[str, ...]  # module names it targets, in storage.spec.MODULES order
    lora_a: dict[str, torch.Tensor] = field(repr=False)  # module -> [num_layers, rank, in_features]
    lora_b: dict[str, torch.Tensor] = field(repr=False)  # module -> [num_layers, out_features, rank]
    digest: str  # sha256 over the adapter's config and tensor files
    nbytes: int  # bytes of the tensors above
