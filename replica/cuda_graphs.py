"""CUDA graphs of decode steps, one per (batch-size bucket, with or without LoRA), captured at start.
Replaying one launches a whole step's kernels for the host cost of one launch; the step's inputs
live in one static buffer that the runner fills before each replay."""

from __future__ import annotations

from collections.abc import Callable

import torch


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8 up to max_num_seqs (included): a batch pads fewer than 8 rows."""
    sizes = [n for n in (1, 2, 4) if n < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    """forward(inputs[:rows], lora) -> logits is captured for every bucket; `inputs` must hold valid
    padding rows while capturing (the runner fills it)."""

    def __init__(
        self, forward: Callable[[torch.Tensor, bool], torch.Tensor], inputs: torch.Tensor, max_num_seqs: int
    ) -> None:
        self.buckets = batch_buckets(max_num_seqs)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        # Largest first: smaller graphs then fit in the memory pool the largest one reserved.
        for rows in reversed(self.buckets):
            for lora in (False, True):
                forward(inputs[:rows], lora)  # warm-up: compiles kernels, settles allocator state
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread_local: the adapter pool's loader threads may touch CUDA meanwhile.
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = forward(inputs[:rows], lora)
                pool = graph.pool()
                self._graphs[rows, lora] = (graph, logits)
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int:
        """The smallest captured batch size >= n."""
        return next(b for b in self.buckets if b >= n)

    def replay(self, rows: int, lora: bool) -> torch.Tensor:
        """Logits [rows, vocab]; valid until the next replay (graphs share one memory pool)."""
        graph, logits = self._graphs[rows, lora]
        graph.replay()
        return logits
