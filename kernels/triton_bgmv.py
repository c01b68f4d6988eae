"""BGMV in Triton: each row reads its own slot's weights, no grouping and no metadata. Decode batches
(one token per request) take one program per (row, tile), with vector products instead of tensor-core dots,
so tiles need no padding to 16 rows. Larger batches (prefill, where a request's tokens are consecutive rows)
take one program per tile of TILE_M consecutive rows, with one tensor-core dot per distinct slot among
them: per-row products there left every weight tile to be multiplied on CUDA cores once per row (H100, one
adapter, rank 64, T=4096: 2-4x slower than a per-adapter loop of two GEMMs). Same two steps as SGMV:
shrink to fp32 partials, expand into y."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.meta import LoRAMeta
from kernels.triton_sgmv import (
    dot_blocks,
    dot_precision,
    expand_load,
    expand_store,
    shrink_tile,
    slice_weights,
    store_partials,
    sum_partials,
    vector_bounds,
    weights_aligned,
)

TILE_M, TILE_N = 64, 128  # the tile kernels', for prefill batches (launch.prefill_tiles)


@triton.jit
def _bgmv_shrink_kernel(x_ptr, sx0, sx1, table_ptr, slot_ids_ptr, ranks_ptr, buf_ptr, T, K, R, k_per_split,
                        HAS_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    r_id, pid_k, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ids_ptr + r_id)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
    a_ptr, sa0, sa1, sa2 = slice_weights(table_ptr + j * 10, 0, x_ptr.dtype.element_ty, ALIGNED)
    a_ptr += slot.to(tl.int64) * sa0
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    x_row = x_ptr + r_id.to(tl.int64) * sx0
    k_start = pid_k * k_per_split
    for k in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xv = tl.load(x_row + offs_k * sx1, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(a_ptr + offs_r[:, None] * sa1 + offs_k[None, :] * sa2,
                     mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += at.to(tl.float32) * xv[None, :]
    out = buf_ptr + ((pid_k * tl.num_programs(2) + j) * T + r_id) * R + offs_r
    tl.store(out, tl.sum(acc, axis=1), mask=offs_r < R)


@triton.jit
def _bgmv_expand_kernel(y_ptr, sy0, sy1, buf_ptr, table_ptr, slot_ids_ptr, ranks_ptr, scalings_ptr,
                        T, R, splits, HAS_RANKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        ALIGNED: tl.constexpr):
    r_id, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ids_ptr + r_id)
    row = table_ptr + j * 10
    n_out = tl.load(row + 8)
    if (slot < 0) | (pid_n * BLOCK_N >= n_out):
        return
    rank, n_out, column = vector_bounds(row, tl.load(ranks_ptr + slot) if HAS_RANKS else R, y_ptr.dtype.element_ty,
                                        ALIGNED)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    t = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(splits):
        t += tl.load(buf_ptr + ((s * tl.num_programs(2) + j) * T + r_id) * R + offs_r, mask=r_mask, other=0.0)
    b_ptr, sb0, sb1, sb2 = slice_weights(row, 4, y_ptr.dtype.element_ty, ALIGNED)
    b_ptr += slot.to(tl.int64) * sb0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    bt = tl.load(b_ptr + offs_n[:, None] * sb1 + offs_r[None, :] * sb2,
                 mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    acc = tl.sum(bt.to(tl.float32) * t[None, :], axis=1) * tl.load(scalings_ptr + slot)
    y_row = y_ptr + r_id.to(tl.int64) * sy0 + (column + offs_n) * sy1
    y_old = tl.load(y_row, mask=n_mask, other=0.0)
    tl.store(y_row, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=n_mask)


@triton.jit
def _bgmv_shrink_tile_kernel(x_ptr, sx0, sx1, table_ptr, slot_ids_ptr, ranks_ptr, buf_ptr, T, K, R, k_per_split,
                             HAS_RANKS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    pid_m, pid_k, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    todo = tl.load(slot_ids_ptr + rows, mask=rows < T, other=-1)  # rows' slots not yet done; -1: done
    rows = rows.to(tl.int64)
    k_lo = pid_k * k_per_split
    slot = tl.max(todo, axis=0)
    while slot >= 0:  # one pass per distinct slot among the rows
        m_mask = todo == slot
        rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
        acc = shrink_tile(x_ptr, sx0, sx1, table_ptr + j * 10, slot, rows, m_mask, rank, k_lo,
                          tl.minimum(k_lo + k_per_split, K), K, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K, ALIGNED)
        store_partials(buf_ptr, acc, pid_k, j, T, R, rows, m_mask, BLOCK_R)
        todo = tl.where(m_mask, -1, todo)
        slot = tl.max(todo, axis=0)


@triton.jit
def _bgmv_expand_tile_kernel(y_ptr, sy0, sy1, buf_ptr, table_ptr, slot_ids_ptr, ranks_ptr, scalings_ptr, T, R,
                             SPLITS: tl.constexpr, HAS_RANKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             ALIGNED: tl.constexpr):
    pid_m, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slice_row = table_ptr + j * 10
    if pid_n * BLOCK_N >= tl.load(slice_row + 8):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    todo = tl.load(slot_ids_ptr + rows, mask=rows < T, other=-1)
    rows = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.max(todo, axis=0)
    while slot >= 0:
        m_mask = todo == slot
        rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
        bt, y_tile, mask = expand_load(y_ptr, sy0, sy1, slice_row, slot, rows, m_mask, rank, offs_n, BLOCK_R,
                                       ALIGNED)
        y_old = tl.load(y_tile, mask=mask, other=0.0)
        t = sum_partials(buf_ptr, j, T, R, rows, m_mask, rank, SPLITS, BLOCK_M, BLOCK_R)
        expand_store(t * tl.load(scalings_ptr + slot), bt, y_tile, mask, y_old, DOT_PRECISION)
        todo = tl.where(m_mask, -1, todo)
        slot = tl.max(todo, axis=0)


def _adapters(lora_a: Sequence[torch.Tensor], meta: LoRAMeta | None) -> int:
    return meta.max_adapters if meta is not None else lora_a[0].shape[0]


def _block(max_rank: int) -> tuple[int, int]:
    """(rank block, k or n block): the [rank, k] and [n, rank] tiles hold 4096 elements."""
    block_r = triton.next_power_of_2(max_rank)
    return block_r, max(16, min(256, 4096 // block_r))


def shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta | None,
           offsets: Sequence[int]) -> torch.Tensor:
    """fp32 partial sums [splits, num_slices, T, max_rank]; rows without adapter are left unwritten."""
    t, k = x.shape
    num_slices, max_rank = len(lora_a), lora_a[0].shape[1]
    table = launch.slice_table(lora_a, lora_b, offsets)
    ranks_arg, aligned = ranks if ranks is not None else table, weights_aligned(lora_a, lora_b, offsets)
    if launch.prefill_tiles(t, _adapters(lora_a, meta)):
        block_r, block_k = dot_blocks(max_rank)
        tiles = triton.cdiv(t, TILE_M)
        splits, per_split = launch.split_k(k, block_k, tiles * num_slices, x.device)
        buf = torch.empty(splits, num_slices, t, max_rank, dtype=torch.float32, device=x.device)
        _bgmv_shrink_tile_kernel[(tiles, splits, num_slices)](
            x, x.stride(0), x.stride(1), table, slot_ids, ranks_arg, buf, t, k, max_rank, per_split,
            HAS_RANKS=ranks is not None, DOT_PRECISION=dot_precision(x), BLOCK_M=TILE_M, BLOCK_R=block_r,
            BLOCK_K=block_k, ALIGNED=aligned, num_warps=4, num_stages=3)
        return buf
    block_r, block_k = _block(max_rank)
    splits, per_split = launch.split_k(k, block_k, t * num_slices, x.device)
    buf = torch.empty(splits, num_slices, t, max_rank, dtype=torch.float32, device=x.device)
    _bgmv_shrink_kernel[(t, splits, num_slices)](
        x, x.stride(0), x.stride(1), table, slot_ids, ranks_arg, buf, t, k, max_rank, per_split,
        HAS_RANKS=ranks is not None, BLOCK_R=block_r, BLOCK_K=block_k, ALIGNED=aligned)
    return buf


def expand(y: torch.Tensor, buf: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta | None,
           offsets: Sequence[int]) -> None:
    splits, num_slices, t, max_rank = buf.shape
    table = launch.slice_table(lora_a, lora_b, offsets)
    ranks_arg, aligned = ranks if ranks is not None else table, weights_aligned(lora_a, lora_b, offsets)
    max_out = max(b.shape[1] for b in lora_b)
    if launch.prefill_tiles(t, _adapters(lora_a, meta)):
        block_r, _ = dot_blocks(max_rank)
        grid = (triton.cdiv(t, TILE_M), triton.cdiv(max_out, TILE_N), num_slices)
        _bgmv_expand_tile_kernel[grid](
            y, y.stride(0), y.stride(1), buf, table, slot_ids, ranks_arg, scalings, t, max_rank, SPLITS=splits,
            HAS_RANKS=ranks is not None, DOT_PRECISION=dot_precision(y), BLOCK_M=TILE_M, BLOCK_N=TILE_N,
            BLOCK_R=block_r, ALIGNED=aligned, num_warps=4, num_stages=3)
        return
    block_r, block_n = _block(max_rank)
    _bgmv_expand_kernel[(t, triton.cdiv(max_out, block_n), num_slices)](
        y, y.stride(0), y.stride(1), buf, table, slot_ids, ranks_arg, scalings, t, max_rank, splits,
        HAS_RANKS=ranks is not None, BLOCK_N=block_n, BLOCK_R=block_r, ALIGNED=aligned)


def add_lora_bgmv(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                  lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor,
                  ranks: torch.Tensor | None, meta: LoRAMeta | None, offsets: Sequence[int]) -> None:
    buf = shrink(x, lora_a, lora_b, slot_ids, ranks, meta, offsets)
    expand(y, buf, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets)
