"""What the Triton and CUDA backends share: the per-slice pointer table, the split-K choice, and whether the
GPU has programmatic dependent launch."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

import torch

# Prefill: batches of more rows than this, at least PREFILL_ROWS_PER_ADAPTER per adapter on average. The
# backends' tile kernels take them (tiles of rows through tensor cores); with fewer rows per slot their
# per-row kernels win (H100, T=1024 rows in random order: triton_bgmv's tiles were 2-3x slower over 1024
# adapters and 1.6-2.7x over 32; over 8 they were 1.2-1.7x faster on three of four shapes).
PREFILL_ROWS_ABOVE = 256
PREFILL_ROWS_PER_ADAPTER = 64


def prefill_tiles(rows: int, adapters: int) -> bool:
    """Whether a batch of `rows` rows over at most `adapters` distinct adapters takes the tile kernels."""
    return rows > PREFILL_ROWS_ABOVE and rows >= PREFILL_ROWS_PER_ADAPTER * adapters


# Columns of the slice table, one row per slice: where its A and B stacks live and how they are laid out.
A_PTR, A_S0, A_S1, A_S2, B_PTR, B_S0, B_S1, B_S2, OUT, OFFSET = range(10)
TABLE_COLS = 10

_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MAX_TABLES = 256


def slice_table(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                offsets: Sequence[int]) -> torch.Tensor:
    """int64 [num_slices, TABLE_COLS] on the weights' device. The engine's weight stacks are fixed
    buffers, so the table is built once per layer and cached (no host-to-device copy per call, which
    also keeps calls capturable in a CUDA graph)."""
    rows = [(a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), b.shape[1], off)
            for a, b, off in zip(lora_a, lora_b, offsets, strict=True)]
    key = (lora_a[0].device, tuple(rows))
    table = _tables.get(key)
    if table is None:
        table = torch.tensor(rows, dtype=torch.int64, device=lora_a[0].device)
        _tables[key] = table
        if len(_tables) > _MAX_TABLES:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return table


def vector_aligned(*tensors: torch.Tensor) -> bool:
    """16-byte vector loads along the last dimension: unit last stride, 16-byte aligned base, and every
    other stride a whole number of vectors."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s % (16 // t.element_size()) == 0 for s in t.stride()[:-1]) for t in tensors)


def num_programs_target(device: torch.device, per_sm: int = 4) -> int:
    """About per_sm programs per SM: enough loads in flight to keep HBM busy."""
    if device.type != "cuda":
        return 8
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def split_k(k: int, block_k: int, programs_without_split: int, device: torch.device,
            per_sm: int = 4, max_splits: int = 16) -> tuple[int, int]:
    """(splits, k per split): the reduction over `in` is cut in parts when rows alone give too few
    programs (decode); the expand step sums the parts, so no zeroing or atomics are needed."""
    k_blocks = -(-k // block_k)
    want = max(1, num_programs_target(device, per_sm) // max(1, programs_without_split))
    splits = min(1 << (want.bit_length() - 1), k_blocks, max_splits)
    per_split = -(-k_blocks // splits) * block_k
    return -(-k // per_split), per_split


@functools.cache
def supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: sm_90 and later (elsewhere, incl. the interpreter, plain launches)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
