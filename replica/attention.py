"""Paged attention: write the step's K/V into the cache, then attend. Decode steps (one new token
per sequence) call the paged decode kernel, which reads the block tables itself and has fixed
shapes, so a decode step can be captured in a CUDA graph. Steps with prompt tokens send their
one-token sequences to the same kernel, and gather the keys of the others (prompts, chunks of
prompts) through their block tables for SDPA with a causal mask, padded to the longest of them only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class DecodeMetadata:
    """One new token per sequence; row b's keys are its first context_lens[b] cache tokens."""

    slot_mapping: torch.Tensor  # int64 [B] cache slot of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    context_lens: torch.Tensor  # int32 [B] (0 on the padding rows of a CUDA-graph batch)
    block_size: int
    backend: str  # kernels.paged_decode_attention backend


@dataclass
class AttentionMetadata:
    """A step with prompt tokens. Rows are the step's flat tokens, sequence after sequence."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    decode_rows: torch.Tensor | None  # [Bd] rows of the sequences with one new token (None: there are none)
    decode: DecodeMetadata | None  # their keys, for the paged decode kernel
    prefill_rows: torch.Tensor  # [Tp] rows of the other sequences, in order
    query_index: torch.Tensor  # [Bp, max_q] row of the flat batch for each padded query (0 on padding)
    kv_slots: torch.Tensor  # [Bp, max_kv] cache slot of each key (0 on padding)
    mask: torch.Tensor  # [Bp, 1, max_q, max_kv] True where a query may attend a key
    output_index: torch.Tensor  # [Tp] position of each of prefill_rows in the flattened [Bp * max_q] output

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        num_computed: list[int],
        num_new: list[int],
        block_size: int,
        device: torch.device,
        backend: str = "auto",
    ) -> AttentionMetadata:
        """Sequence b brings num_new[b] tokens after num_computed[b] cached ones; backend is the paged
        decode kernel's. Built with numpy on the host: a step's metadata costs a few array operations,
        not a few per sequence."""
        new, cached = np.asarray(num_new), np.asarray(num_computed)
        total, first = cached + new, np.cumsum(new) - new  # first: each sequence's first row
        tables = np.zeros((len(new), max(map(len, block_tables))), dtype=np.int64)
        for b, table in enumerate(block_tables):
            tables[b, : len(table)] = table

        def slots(seqs: np.ndarray, pos: np.ndarray) -> np.ndarray:
            return tables[seqs, pos // block_size] * block_size + pos % block_size

        seq_of_row = np.repeat(np.arange(len(new)), new)
        rows = np.arange(len(seq_of_row))
        slot_mapping = slots(seq_of_row, cached[seq_of_row] + rows - first[seq_of_row])

        def to(a: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        slot_mapping_t = to(slot_mapping)
        one = np.flatnonzero(new == 1)
        decode_rows = decode = None
        if len(one):
            decode_rows = to(first[one])
            decode = DecodeMetadata(
                slot_mapping=slot_mapping_t[decode_rows], block_tables=to(tables[one], torch.int32),
                context_lens=to(total[one], torch.int32), block_size=block_size, backend=backend,
            )  # fmt: skip
        many = np.flatnonzero(new > 1)
        max_q = int(new[many].max(initial=1))
        max_kv = -(-int(total[many].max(initial=1)) // block_size) * block_size  # fewer distinct shapes
        offsets = np.arange(max_q)
        valid_q = offsets < new[many, None]  # [Bp, max_q]
        q_rows = first[many, None] + offsets
        q_pos = np.where(valid_q, cached[many, None] + offsets, -1)
        key_pos = np.arange(max_kv)
        in_context = key_pos < total[many, None]
        mask = (key_pos <= q_pos[:, :, None]) & in_context[:, None, :]
        mask[q_pos < 0] = key_pos == 0  # padding queries attend one key, so no row is all -inf
        kv_slots = np.where(in_context, slots(many[:, None], np.minimum(key_pos, total[many, None] - 1)), 0)
        return cls(
            slot_mapping=slot_mapping_t,
            decode_rows=decode_rows,
            decode=decode,
            prefill_rows=to(q_rows[valid_q]),
            query_index=to(np.where(valid_q, q_rows, 0)),
            kv_slots=to(kv_slots),
            mask=to(mask[:, None], torch.bool),
            output_index=to(np.flatnonzero(valid_q)),
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata | DecodeMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for the step's tokens; returns [T, Hq, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if isinstance(meta, DecodeMetadata):
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.decode is not None:
        decoded = _decode_attention(q[meta.decode_rows], k_cache, v_cache, meta.decode, scale)
        out.index_copy_(0, meta.decode_rows, decoded)
    if not meta.prefill_rows.numel():
        return out
    queries = q[meta.query_index].transpose(1, 2)  # [Bp, Hq, max_q, D]
    # Keys and values repeated for every query head of their group: SDPA's kernel for masked attention
    # (memory-efficient) takes no grouped heads, so with enable_gqa a masked call ran the math fallback:
    # a dozen kernels per layer, half the host time of a step that mixes a prompt into decoding (H100).
    group = q.shape[1] // k.shape[1]
    keys = k_cache[meta.kv_slots].repeat_interleave(group, dim=2).transpose(1, 2)  # [Bp, Hq, max_kv, D]
    values = v_cache[meta.kv_slots].repeat_interleave(group, dim=2).transpose(1, 2)
    # Not cuDNN: it builds a plan for every new shape, and the key length changes every step.
    with sdpa_kernel(_BACKENDS):
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=scale)
    return out.index_copy_(0, meta.prefill_rows, attended.transpose(1, 2).flatten(0, 1)[meta.output_index])


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                      scale: float) -> torch.Tensor:
    return kernels.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens,
        block_size=meta.block_size, scale=scale, backend=meta.backend,
    )  # fmt: skip
