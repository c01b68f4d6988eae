"""Turns a scheduled step into one forward pass: flat token batch, paged-attention
metadata, the step's LoRA view (metadata built once, reused by every layer), sampling.
Decode steps (one new token per sequence) take a fixed-shape path: their inputs are packed
into one static buffer, and on CUDA a captured graph replays the whole step.
A step is launched before the previous one's tokens reach the host (the way vLLM's async
scheduling hides the host's work behind the GPU's): a token still pending is read on the
device, from the previous step's sampled tokens."""

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
# host-to-device copy per step. FED: the row of the previous step's sampled tokens that holds the
# input token (-1: TOKEN holds it).
TOKEN, POSITION, CACHE_SLOT, CONTEXT_LEN, LORA_SLOT, FED, BLOCKS = range(7)


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
        pin = device.type == "cuda"
        # Host buffers that a launch fills or that its copies land in, two used in turn: the step before
        # the last has been collected, so its buffers are free (a step samples at most max_num_seqs).
        self._launches = 0
        self._sampled_host = [torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        # The last launched step's sampled tokens on the device, and which row holds each sequence's.
        self._fed_tokens = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self._fed_rows: dict[Sequence, int] = {}
        if attention_backend == "auto":
            attention_backend = "triton" if device.type == "cuda" else "torch"
        self.attention_backend = attention_backend
        model.ops_backend = attention_backend  # its norm / rotary / silu kernels follow the same choice
        shape = (max_num_seqs, BLOCKS + -(-max_model_len // block_size))
        # A row that attends to nothing and writes its K/V into the cache's padding block.
        self._padding = np.zeros(shape[1], dtype=np.int32)
        self._padding[CACHE_SLOT], self._padding[LORA_SLOT], self._padding[FED] = kv_cache.pad_slot, -1, -1
        self._decode_host = [torch.from_numpy(np.tile(self._padding, (shape[0], 1))) for _ in range(2)]
        if pin:
            self._decode_host = [t.pin_memory() for t in self._decode_host]
        self._decode_inputs = self._decode_host[0].to(device)
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
        fed: dict[int, int] = {}  # index in ids -> row of _fed_tokens, for the pending tokens
        positions: list[int] = []
        slot_ids: list[int] = []
        for seq, n in zip(step.seqs, step.num_new, strict=True):
            start = seq.num_computed
            ids.extend(seq.token_ids[start : start + n])
            if (row := self._pending_row(seq, start + n - 1)) >= 0:  # its last token is still on the device
                fed[len(ids)] = row
                ids.append(0)
            positions.extend(range(start, start + n))
            slot_ids.extend([seq.slot] * n)
        attn = AttentionMetadata.build(
            [s.block_table for s in step.seqs],
            [s.num_computed for s in step.seqs],
            step.num_new,
            self.block_size,
            self.device,
            self.attention_backend,
        )
        lora = None
        num_adapters = self._adapters_ready(step.seqs)
        if num_adapters:  # else a base-only step: skip every LoRA call
            # the adapter count sizes the kernels' tiles and picks the backend: a prefill over few
            # adapters is a few long segments, not one per slot
            lora = self._lora_batch(torch.tensor(slot_ids, dtype=torch.int32, device=self.device), num_adapters)
        tokens = torch.tensor(ids, device=self.device)
        if fed:
            fed_rows = torch.full((len(ids),), -1, dtype=torch.int32)
            fed_rows[list(fed)] = torch.tensor(list(fed.values()), dtype=torch.int32)
            tokens = self._fed_back(tokens, fed_rows.to(self.device))
        hidden = self.model(
            tokens,
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
        be collected once the host has done its other work, at the latest after the next launch (two
        steps are in flight at most). Those tokens are pending until then."""
        self._launches += 1
        done, logits = self.forward(step)
        self._fed_rows = {seq: i for i, seq in enumerate(done)}
        if not done:
            return SampledTokens([], None, None)
        tokens = self.sampler(logits, [s.params for s in done], [s.generator for s in done])
        self._fed_tokens[: len(done)].copy_(tokens)
        for seq in done:
            seq.num_pending += 1
        host = self._sampled_host[self._launches % 2][: len(done)]
        host.copy_(tokens, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return SampledTokens(done, host, ready)

    def _decode(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        n, bs = len(seqs), self.block_size
        host = self._decode_host[self._launches % 2]
        rows = host.numpy()
        done, done_rows = [], []
        for i, seq in enumerate(seqs):
            pos, table = seq.num_computed, seq.block_table
            row = rows[i]
            fed = self._pending_row(seq, pos)
            token = seq.token_at(pos) if fed < 0 else 0
            row[:BLOCKS] = (token, pos, table[pos // bs] * bs + pos % bs, pos + 1, seq.slot, fed)
            row[BLOCKS : BLOCKS + len(table)] = table
            seq.num_computed = pos + 1
            if seq.num_computed == seq.num_tokens:  # else a prompt chunked down to one token
                done.append(seq)
                done_rows.append(i)
        padded = self.graphs.bucket(n) if self.graphs is not None else n
        rows[n:padded, :BLOCKS] = self._padding[:BLOCKS]
        inputs = self._decode_inputs[:padded]
        inputs.copy_(host[:padded], non_blocking=True)
        num_adapters = self._adapters_ready(seqs)
        if self.graphs is not None:
            logits = self.graphs.replay(padded, num_adapters)
        else:
            logits = self._decode_logits(inputs, num_adapters)
        if done_rows == list(range(len(done_rows))):  # a slice: indexing by a list would wait for the GPU
            return done, logits[: len(done_rows)]
        return done, logits[done_rows]

    def _pending_row(self, seq: Sequence, pos: int) -> int:
        """The row of _fed_tokens holding seq's token at pos while it is pending; -1 once the host has it."""
        return self._fed_rows[seq] if pos >= seq.num_tokens - seq.num_pending else -1

    def _fed_back(self, tokens: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """The input tokens, with those of rows whose fed >= 0 read from the previous step's samples."""
        return torch.where(fed >= 0, self._fed_tokens.index_select(0, fed.clamp(min=0)), tokens.long())

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
        tokens = self._fed_back(inputs[:, TOKEN], inputs[:, FED])
        hidden = self.model(tokens, inputs[:, POSITION].long(), self.kv_cache, attn, lora)
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
