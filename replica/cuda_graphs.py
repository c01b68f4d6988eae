"""CUDA graphs of decode steps, captured at start: per batch-size bucket, one without LoRA and one
per cap on the batch's distinct adapters (the LoRA kernels' grids are sized by it). Replaying one
launches a whole step's kernels for the host cost of one launch; the step's inputs live in one
static buffer that the runner fills before each replay."""

from __future__ import annotations

from collections.abc import Callable

import torch

_ADAPTER_CAPS = (4, 16, 32, 64)  # plus the slot count: few adapters in a batch get small LoRA grids


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8 up to max_num_seqs (included): a batch pads fewer than 8 rows."""
    sizes = [n for n in (1, 2, 4) if n < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


def adapter_caps(rows: int, num_slots: int) -> list[int]:
    """The distinct-adapter caps captured for a bucket of `rows` (a batch cannot use more than
    min(rows, num_slots) adapters)."""
    most = min(rows, num_slots)
    return sorted({min(c, most) for c in (*_ADAPTER_CAPS, most)})


class DecodeGraphs:
    """forward(inputs[:rows], max_adapters) -> logits, with max_adapters 0 meaning no LoRA, is
    captured for every bucket and cap; `inputs` must hold valid padding rows while capturing."""

    def __init__(
        self, forward: Callable[[torch.Tensor, int], torch.Tensor], inputs: torch.Tensor, max_num_seqs: int,
        num_slots: int,
    ) -> None:
        self.buckets = batch_buckets(max_num_seqs)
        self._caps = {rows: adapter_caps(rows, num_slots) for rows in self.buckets}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        # Largest first: smaller graphs then fit in the memory pool the largest one reserved.
        for rows in reversed(self.buckets):
            for cap in (0, *self._caps[rows]):
                forward(inputs[:rows], cap)  # warm-up: compiles kernels, settles allocator state
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread_local: the adapter pool's loader threads may touch CUDA meanwhile.
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = forward(inputs[:rows], cap)
                pool = graph.pool()
                self._graphs[rows, cap] = (graph, logits)
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int:
        """The smallest captured batch size >= n."""
        return next(b for b in self.buckets if b >= n)

    def replay(self, rows: int, num_adapters: int) -> torch.Tensor:
        """Logits [rows, vocab] of the graph for `rows` with the smallest cap >= num_adapters (0: no
        LoRA); valid until the next replay (graphs share one memory pool)."""
        cap = 0 if num_adapters == 0 else next(c for c in self._caps[rows] if c >= num_adapters)
        graph, logits = self._graphs[rows, cap]
        graph.replay()
        return logits
