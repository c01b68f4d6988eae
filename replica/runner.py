"""Turns a scheduled step into one forward pass: flat token batch, paged-attention
metadata, the step's LoRA view (metadata built once, reused by every layer), sampling.
Decode steps (one new token per sequence) take a fixed-shape path: their inputs are packed
into one static buffer, and on CUDA a captured graph replays the whole step."""

from __future__ import annotations

import numpy as np
import torch

import kernels
from replica.adapter_pool import AdapterPool
from replica.attention import AttentionMetadata, DecodeMetadata
from replica.cuda_graphs import DecodeGraphs
from replica.kv_cache import KVCache
from replica.model import LlamaModel, LoRABatch
from replica.sampling import Sampler
from replica.scheduler import SchedulerOutput
from replica.sequence import Sequence

# Columns of the packed decode inputs (int32, a row per sequence, its block table last): one
# host-to-device copy per step.
TOKEN, POSITION, CACHE_SLOT, CONTEXT_LEN, LORA_SLOT, BLOCKS = range(6)


class SampledTokens:
    """A launched step's sampled tokens on their way to the host."""

    def __init__(self, seqs: list[Sequence], host: torch.Tensor | None, ready: torch.cuda.Event | None) -> None:
        self.seqs = seqs
        self._host = host
        self._ready = ready

    def result(self) -> list[tuple[Sequence, int]]:
        """(sequence, its next token) for each sequence that sampled; waits for the step to finish."""
        if self._ready is not None:
            self._ready.synchronize()
        return list(zip(self.seqs, self._host.tolist(), strict=True)) if self.seqs else []


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
        max_num_seqs: int,
        max_model_len: int,
        attention_backend: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.pool = pool
        self.block_size = block_size
        self.kernel_backend = kernel_backend
        self.device = device
        self.sampler = Sampler(device)
        # Where a step's sampled tokens land, copied without a wait (a step samples at most max_num_seqs).
        self._sampled_host = torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=device.type == "cuda")
        if attention_backend == "auto":
            attention_backend = "triton" if device.type == "cuda" else "torch"
        self.attention_backend = attention_backend
        model.ops_backend = attention_backend  # its norm / rotary / silu kernels follow the same choice
        shape = (max_num_seqs, BLOCKS + -(-max_model_len // block_size))
        self._decode_host = torch.zeros(shape, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._decode_rows = self._decode_host.numpy()
        # A row that attends to nothing and writes its K/V into the cache's padding block.
        self._padding = np.zeros(shape[1], dtype=np.int32)
        self._padding[CACHE_SLOT], self._padding[LORA_SLOT] = kv_cache.pad_slot, -1
        self._decode_rows[:] = self._padding
        self._decode_inputs = self._decode_host.to(device)
        self.graphs = None
        if cuda_graphs and device.type == "cuda":
            with torch.inference_mode():
                self.graphs = DecodeGraphs(
                    self._decode_logits, self._decode_inputs, max_num_seqs, len(pool.scalings)
                )

    @torch.inference_mode()
    def forward(self, step: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the step's tokens; returns the sequences whose prompt is now complete and
        the logits [len, vocab] of their last token."""
        if all(n == 1 for n in step.num_new):
            return self._decode(step.seqs)
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
        lora = None
        num_adapters = self._adapters_ready(step.seqs)
        if num_adapters:  # else a base-only step: skip every LoRA call
            # the adapter count sizes the kernels' tiles and picks the backend: a prefill over few
            # adapters is a few long segments, not one per slot
            lora = self._lora_batch(torch.tensor(slot_ids, dtype=torch.int32, device=self.device), num_adapters)
        hidden = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_cache,
            attn,
            lora,
        )
        done, rows, end = [], [], 0
        for seq, n in zip(step.seqs, step.num_new, strict=True):
            end += n
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                done.append(seq)
                rows.append(end - 1)
        return done, self.model.compute_logits(hidden[rows])

    def launch(self, step: SchedulerOutput) -> SampledTokens:
        """Forward and sample without waiting for the GPU: the tokens of the sequences that sample, to
        be collected once the host has done its other work (only one step is in flight at a time)."""
        done, logits = self.forward(step)
        if not done:
            return SampledTokens([], None, None)
        tokens = self.sampler(logits, [s.params for s in done], [s.generator for s in done])
        host = self._sampled_host[: len(done)]
        host.copy_(tokens, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return SampledTokens(done, host, ready)

    def _decode(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        n, bs, rows = len(seqs), self.block_size, self._decode_rows
        done, done_rows = [], []
        for i, seq in enumerate(seqs):
            pos, table = seq.num_computed, seq.block_table
            row = rows[i]
            row[:BLOCKS] = (seq.token_at(pos), pos, table[pos // bs] * bs + pos % bs, pos + 1, seq.slot)
            row[BLOCKS : BLOCKS + len(table)] = table
            seq.num_computed = pos + 1
            if seq.num_computed == seq.num_tokens:  # else a prompt chunked down to one token
                done.append(seq)
                done_rows.append(i)
        padded = self.graphs.bucket(n) if self.graphs is not None else n
        rows[n:padded, :BLOCKS] = self._padding[:BLOCKS]
        inputs = self._decode_inputs[:padded]
        inputs.copy_(self._decode_host[:padded], non_blocking=True)
        num_adapters = self._adapters_ready(seqs)
        if self.graphs is not None:
            logits = self.graphs.replay(padded, num_adapters)
        else:
            logits = self._decode_logits(inputs, num_adapters)
        return done, logits[done_rows] if len(done_rows) < padded else logits

    def _adapters_ready(self, seqs: list[Sequence]) -> int:
        """How many distinct adapters the step's sequences use; with any, their slot copies are made
        visible to the compute stream first."""
        num_adapters = len({s.slot for s in seqs if s.slot >= 0})
        if num_adapters:
            self.pool.wait_copies()
        return num_adapters

    def _decode_logits(self, inputs: torch.Tensor, max_adapters: int) -> torch.Tensor:
        """The decode forward over packed inputs, with LoRA for at most max_adapters distinct adapters
        (0: none); fixed shapes and no host sync (graph-capturable)."""
        attn = DecodeMetadata(
            slot_mapping=inputs[:, CACHE_SLOT].long(),
            block_tables=inputs[:, BLOCKS:].contiguous(),
            context_lens=inputs[:, CONTEXT_LEN].contiguous(),
            block_size=self.block_size,
            backend=self.attention_backend,
        )
        lora = self._lora_batch(inputs[:, LORA_SLOT].contiguous(), max_adapters) if max_adapters else None
        hidden = self.model(inputs[:, TOKEN].long(), inputs[:, POSITION].long(), self.kv_cache, attn, lora)
        return self.model.compute_logits(hidden)

    def _lora_batch(self, slots: torch.Tensor, max_adapters: int) -> LoRABatch:
        pool = self.pool
        return LoRABatch(
            lora_a=pool.lora_a,
            lora_b=pool.lora_b,
            slot_ids=slots,
            scalings=pool.scalings,
            ranks=pool.ranks,
            meta=kernels.LoRAMeta.build(slots, len(pool.scalings), max_adapters),
            backend=self.kernel_backend,
        )
