"""Per-batch metadata: rows grouped by adapter slot, built once per step, shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.checks import describe


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True, eq=False)
class LoRAMeta:
    """Rows of one batch ordered by slot. Everything lives on the slot_ids' device.

    sorted_rows: int32 [T], row indices ordered by slot (rows without adapter first), stable.
    counts:      int32 [num_slots], rows per slot (the length of each slot's segment).
    seg_starts:  int32 [num_slots], where each slot's segment starts in sorted_rows.
    Every slot owns one (possibly empty) segment, so the slot of segment s is s itself; building
    needs no host sync besides the range checks, and none at all during CUDA graph capture.
    max_adapters: at most this many distinct slots among the rows (default num_slots); it sizes the
    kernels' grids, so a batch of few adapters over many slots does not launch a program per slot.
    """

    slot_ids: torch.Tensor
    num_slots: int
    sorted_rows: torch.Tensor
    counts: torch.Tensor
    seg_starts: torch.Tensor
    max_adapters: int
    _blocks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return self.slot_ids.shape[0]

    @classmethod
    def build(cls, slot_ids: torch.Tensor, num_slots: int, max_adapters: int | None = None) -> LoRAMeta:
        check_slot_ids(slot_ids, num_slots, max_adapters)
        device = slot_ids.device
        sorted_rows = torch.sort(slot_ids, stable=True).indices.to(torch.int32)
        # Index 0 counts the rows without adapter (slot -1); they sort first.
        counts_all = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        counts_all.scatter_add_(0, (slot_ids + 1).long(), torch.ones_like(slot_ids))
        counts = counts_all[1:]
        seg_starts = (torch.cumsum(counts_all, 0, dtype=torch.int32)[1:] - counts).contiguous()
        max_adapters = num_slots if max_adapters is None else min(max_adapters, num_slots)
        return cls(slot_ids, num_slots, sorted_rows, counts.contiguous(), seg_starts, max_adapters)

    def blocks(self, block_m: int) -> torch.Tensor:
        """int32 [max_blocks, 3]: (slot, first, end) in sorted_rows of every block of at most block_m
        rows of one segment; slot -1 marks unused entries. max_blocks depends only on T and max_adapters,
        so a kernel grid over it is fixed for a batch shape (CUDA-graph friendly)."""
        if block_m not in self._blocks:
            self._blocks[block_m] = self._build_blocks(block_m)
        return self._blocks[block_m]

    def _build_blocks(self, block_m: int) -> torch.Tensor:
        t, device = self.num_rows, self.slot_ids.device
        # Empty segments take no blocks, so the used ones come first and fit in this many.
        max_blocks = -(-t // block_m) + min(t, self.max_adapters)
        blocks_per_slot = (self.counts + block_m - 1) // block_m
        ends = torch.cumsum(blocks_per_slot, 0)
        b = torch.arange(max_blocks, device=device, dtype=ends.dtype)
        slot = torch.searchsorted(ends, b, right=True)
        valid = slot < self.num_slots
        slot_c = slot.clamp(max=self.num_slots - 1)
        first_block = ends[slot_c] - blocks_per_slot[slot_c]
        first = self.seg_starts[slot_c] + (b - first_block) * block_m
        end = torch.minimum(first + block_m, self.seg_starts[slot_c] + self.counts[slot_c])
        # Unused entries get an empty row range, so kernels may read rows before looking at the slot.
        table = torch.stack([torch.where(valid, slot, -1), torch.where(valid, first, 0), torch.where(valid, end, 0)],
                            dim=1)
        return table.to(torch.int32).contiguous()


def check_slot_ids(slot_ids: torch.Tensor, num_slots: int, max_adapters: int | None = None) -> None:
    if not isinstance(slot_ids, torch.Tensor) or slot_ids.dtype != torch.int32 or slot_ids.dim() != 1:
        raise ValueError(f"slot_ids: expected a 1-D int32 tensor, got {describe(slot_ids)}")
    if not isinstance(num_slots, int) or num_slots < 0:
        raise ValueError(f"num_slots: expected an int >= 0, got {num_slots!r}")
    if slot_ids.numel() == 0 or _capturing(slot_ids):
        return
    lo, hi = (int(v) for v in torch.aminmax(slot_ids))
    if lo < -1 or hi >= num_slots:
        raise ValueError(f"slot_ids: values must lie in [-1, {num_slots - 1}] (num_slots={num_slots}), "
                         f"got min {lo} and max {hi}")
    if max_adapters is not None and int((torch.unique(slot_ids) >= 0).sum()) > max_adapters:
        raise ValueError(f"slot_ids: more than max_adapters={max_adapters} distinct slots")
