"""backend="auto": the reference on the CPU; on a GPU, the backend measured fastest for the nearest
measured shape. auto_table.json is written by `python -m benchmarks.kernels --auto-table` on a GPU."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("auto_table.json")
FALLBACK = "triton_sgmv"


_rows: tuple[dict, ...] | None = None


def _table() -> tuple[dict, ...]:
    global _rows
    if _rows is None:
        _rows = tuple(json.loads(TABLE_PATH.read_text())) if TABLE_PATH.exists() else ()
    return _rows


def use_table(rows: list[dict]) -> None:
    """Replaces the committed table (the benchmark measures auto with the table it is deriving)."""
    global _rows
    _rows = tuple(rows)
    _nearest.cache_clear()


@functools.cache
def _usable(backend: str) -> bool:
    if backend != "cuda":
        return True
    from kernels.cuda import extension

    try:
        extension()
    except RuntimeError:  # no nvcc here: the measured choice cannot run, fall back
        return False
    return True


def choose_backend(x: torch.Tensor, lora_a: tuple, lora_b: tuple, adapters: int) -> str:
    """adapters: how many distinct adapters the rows may use (the table's "slots": it was measured
    with every slot in use), not how many slots the stacks have."""
    if not x.is_cuda:
        return "torch"
    shape = (x.shape[0], adapters, sum(b.shape[1] for b in lora_b), lora_a[0].shape[1])
    return _nearest(*shape)


@functools.lru_cache(maxsize=4096)
def _nearest(t: int, slots: int, out: int, rank: int) -> str:
    def distance(row: dict) -> float:
        return sum(abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))
                   for a, b in ((t, row["t"]), (slots, row["slots"]), (out, row["out"]), (rank, row["rank"])))

    usable = [row for row in _table() if _usable(row["backend"])]
    return min(usable, key=distance)["backend"] if usable else FALLBACK
