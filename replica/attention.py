"""Paged attention: write the step's K/V into the cache, then attend. Steps with prompt tokens
gather each sequence's keys through its block table and run SDPA with a causal mask; decode
steps (one new token per sequence) call the paged decode kernel, which reads the block tables
itself and has fixed shapes, so a decode step can be captured in a CUDA graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    query_index: torch.Tensor  # [B, max_q] row of the flat batch for each padded query (0 on padding)
    kv_slots: torch.Tensor  # [B, max_kv] cache slot of each key (0 on padding)
    mask: torch.Tensor  # [B, 1, max_q, max_kv] True where a query may attend a key
    output_index: torch.Tensor  # [T] position of each token in the flattened [B * max_q] output

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        num_computed: list[int],
        num_new: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """Sequence b brings num_new[b] tokens after num_computed[b] cached ones."""
        batch = len(num_new)
        max_q, max_kv = max(num_new), max(c + n for c, n in zip(num_computed, num_new, strict=True))
        max_kv = -(-max_kv // block_size) * block_size  # fewer distinct shapes for the attention kernels
        q_pos = torch.full((batch, max_q), -1, dtype=torch.long)
        query_index = torch.zeros((batch, max_q), dtype=torch.long)
        kv_slots = torch.zeros((batch, max_kv), dtype=torch.long)
        kv_len = torch.zeros((batch, 1), dtype=torch.long)
        slot_mapping, output_index = [], []
        row = 0
        for b, (table, cached, new) in enumerate(zip(block_tables, num_computed, num_new, strict=True)):
            total = cached + new
            pos = torch.arange(total)
            slots = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
            kv_slots[b, :total] = slots
            kv_len[b] = total
            q_pos[b, :new] = pos[cached:]
            query_index[b, :new] = torch.arange(row, row + new)
            slot_mapping.append(slots[cached:])
            output_index.append(torch.arange(b * max_q, b * max_q + new))
            row += new
        key_pos = torch.arange(max_kv)
        mask = (key_pos <= q_pos[:, :, None]) & (key_pos < kv_len[:, :, None])
        mask[q_pos < 0] = key_pos == 0  # padding queries attend one key, so no row is all -inf
        return cls(
            slot_mapping=torch.cat(slot_mapping).to(device),
            query_index=query_index.to(device),
            kv_slots=kv_slots.to(device),
            mask=mask[:, None].to(device),
            output_index=torch.cat(output_index).to(device),
        )


@dataclass
class DecodeMetadata:
    """One new token per sequence; row b's keys are its first context_lens[b] cache tokens."""

    slot_mapping: torch.Tensor  # int64 [B] cache slot of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    context_lens: torch.Tensor  # int32 [B] (0 on the padding rows of a CUDA-graph batch)
    block_size: int
    backend: str  # kernels.paged_decode_attention backend


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
        return kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens,
            block_size=meta.block_size, scale=scale, backend=meta.backend,
        )  # fmt: skip
    queries = q[meta.query_index].transpose(1, 2)  # [B, Hq, max_q, D]
    keys = k_cache[meta.kv_slots].transpose(1, 2)  # [B, Hkv, max_kv, D]
    values = v_cache[meta.kv_slots].transpose(1, 2)
    # Not cuDNN: it builds a plan for every new shape, and the key length changes every step.
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=meta.mask,
            scale=scale,
            enable_gqa=keys.shape[1] != queries.shape[1],
        )
    return out.transpose(1, 2).flatten(0, 1)[meta.output_index]
