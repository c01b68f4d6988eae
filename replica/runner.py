"""Turns a scheduled step into one forward pass: flat token batch, paged-attention
metadata, the step's LoRA view (metadata built once, reused by every layer), sampling."""

from __future__ import annotations

import torch

import kernels
from replica.adapter_pool import AdapterPool
from replica.attention import AttentionMetadata
from replica.kv_cache import KVCache
from replica.model import LlamaModel, LoRABatch
from replica.sampling import Sampler
from replica.scheduler import SchedulerOutput
from replica.sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        pool: AdapterPool,
        *,
        block_size: int,
        kernel_backend: str,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.pool = pool
        self.block_size = block_size
        self.kernel_backend = kernel_backend
        self.device = device
        self.sampler = Sampler()

    @torch.inference_mode()
    def forward(self, step: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the step's tokens; returns the sequences whose prompt is now complete and
        the logits [len, vocab] of their last token."""
        ids: list[int] = []
        positions: list[int] = []
        slot_ids: list[int] = []
        for seq, n in zip(step.seqs, step.num_new, strict=True):
            start = seq.num_computed
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slot_ids.extend([seq.slot] * n)
        attn = AttentionMetadata.build(
            [s.block_table for s in step.seqs],
            [s.num_computed for s in step.seqs],
            step.num_new,
            self.block_size,
            self.device,
        )
        hidden = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_cache,
            attn,
            self._lora_batch(slot_ids),
        )
        done, rows, end = [], [], 0
        for seq, n in zip(step.seqs, step.num_new, strict=True):
            end += n
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                done.append(seq)
                rows.append(end - 1)
        return done, self.model.compute_logits(hidden[rows])

    def step(self, step: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Forward and sample: (sequence, its next token) for each sequence that samples."""
        done, logits = self.forward(step)
        if not done:
            return []
        tokens = self.sampler(logits, [s.params for s in done], [s.generator for s in done])
        return list(zip(done, tokens, strict=True))

    def _lora_batch(self, slot_ids: list[int]) -> LoRABatch | None:
        if max(slot_ids) < 0:
            return None  # base-only step: skip every LoRA call
        pool = self.pool
        slots = torch.tensor(slot_ids, dtype=torch.int32, device=self.device)
        pool.wait_copies()
        return LoRABatch(
            lora_a=pool.lora_a,
            lora_b=pool.lora_b,
            slot_ids=slots,
            scalings=pool.scalings,
            ranks=pool.ranks,
            meta=kernels.LoRAMeta.build(slots, len(pool.scalings)),
            backend=self.kernel_backend,
        )
