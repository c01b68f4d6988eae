"""The PyTorch reference (fp32 accumulation) and the per-adapter loop baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def per_slot_loop(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                  lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor,
                  ranks: torch.Tensor | None, offsets: Sequence[int], compute_dtype: torch.dtype) -> None:
    """One pair of matmuls per (adapter present in the batch, slice), in compute_dtype."""
    rank_of = ranks.tolist() if ranks is not None else None
    for s in torch.unique(slot_ids).tolist():
        if s < 0:
            continue
        rows = torch.nonzero(slot_ids == s).squeeze(1)
        xs = x.index_select(0, rows).to(compute_dtype)
        for a, b, off in zip(lora_a, lora_b, offsets, strict=True):
            r = rank_of[s] if rank_of is not None else a.shape[1]
            delta = (xs @ a[s, :r].to(compute_dtype).T) @ b[s, :, :r].to(compute_dtype).T
            cols = slice(off, off + b.shape[1])
            y[rows, cols] = (y[rows, cols].to(compute_dtype) + delta * scalings[s].to(compute_dtype)).to(y.dtype)


def add_lora_torch(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets) -> None:
    # The definition of correctness: full padded rank, everything in fp32.
    per_slot_loop(y, x, lora_a, lora_b, slot_ids, scalings, None, offsets, torch.float32)


def add_lora_loop(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets) -> None:
    # The naive baseline: a per-adapter loop in the weights' own dtype.
    per_slot_loop(y, x, lora_a, lora_b, slot_ids, scalings, ranks, offsets, x.dtype)


def add_lora_gather_bmm(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets) -> None:
    # The other naive baseline: gather every row's own weights, then batched matmuls.
    rows = torch.nonzero(slot_ids >= 0).squeeze(1)
    if rows.numel() == 0:
        return
    slots = slot_ids.index_select(0, rows).long()
    xs = x.index_select(0, rows).unsqueeze(1)
    scale = scalings.index_select(0, slots).to(x.dtype)[:, None]
    for a, b, off in zip(lora_a, lora_b, offsets, strict=True):
        xa = torch.bmm(xs, a.index_select(0, slots).transpose(1, 2))
        delta = torch.bmm(xa, b.index_select(0, slots).transpose(1, 2)).squeeze(1)
        cols = slice(off, off + b.shape[1])
        y[rows, cols] += delta * scale
