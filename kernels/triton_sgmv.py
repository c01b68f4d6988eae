"""SGMV in Triton: rows grouped in segments that share a slot (LoRAMeta), one tile of a segment per
program, tensor-core dots. Shrink writes fp32 partial sums per split of `in`; expand sums them,
multiplies by B and the slot's scaling and adds into y. All slices go in one launch per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.meta import LoRAMeta


@triton.jit
def _sgmv_shrink_kernel(x_ptr, sx0, sx1, table_ptr, blocks_ptr, sorted_rows_ptr, ranks_ptr, buf_ptr,
                        T, K, R, k_per_split, HAS_RANKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b, pid_k, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(blocks_ptr + pid_b * 3)
    if slot < 0:
        return
    first = tl.load(blocks_ptr + pid_b * 3 + 1)
    end = tl.load(blocks_ptr + pid_b * 3 + 2)
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(sorted_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
    row = table_ptr + j * 10
    a_ptr = tl.load(row + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
    a_ptr += slot.to(tl.int64) * tl.load(row + 1)
    sa1, sa2 = tl.load(row + 2), tl.load(row + 3)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * sx0 + offs_k[None, :] * sx1,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * sa1 + offs_k[:, None] * sa2,
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc += tl.dot(xt, at, input_precision=DOT_PRECISION)
    out = buf_ptr + ((pid_k * tl.num_programs(2) + j) * T + rows[:, None]) * R + offs_r[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def _sgmv_expand_kernel(y_ptr, sy0, sy1, buf_ptr, table_ptr, blocks_ptr, sorted_rows_ptr, ranks_ptr,
                        scalings_ptr, T, R, splits, HAS_RANKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_b, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(blocks_ptr + pid_b * 3)
    row = table_ptr + j * 10
    n_out = tl.load(row + 8)
    if (slot < 0) | (pid_n * BLOCK_N >= n_out):
        return
    first = tl.load(blocks_ptr + pid_b * 3 + 1)
    end = tl.load(blocks_ptr + pid_b * 3 + 2)
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(sorted_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for s in range(splits):
        part = buf_ptr + ((s * tl.num_programs(2) + j) * T + rows[:, None]) * R + offs_r[None, :]
        t += tl.load(part, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    b_ptr = tl.load(row + 4).to(tl.pointer_type(y_ptr.dtype.element_ty))
    b_ptr += slot.to(tl.int64) * tl.load(row + 5)
    sb1, sb2 = tl.load(row + 6), tl.load(row + 7)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    bt = tl.load(b_ptr + offs_n[None, :] * sb1 + offs_r[:, None] * sb2,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    acc = tl.dot(t.to(bt.dtype), bt, input_precision=DOT_PRECISION) * tl.load(scalings_ptr + slot)
    cols = tl.load(row + 9) + offs_n
    y_tile = y_ptr + rows[:, None] * sy0 + cols[None, :] * sy1
    mask = m_mask[:, None] & n_mask[None, :]
    y_old = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=mask)


def sgmv_block_m(num_rows: int) -> int:
    return 16 if num_rows <= 256 else 64


def shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta, offsets: Sequence[int]) -> torch.Tensor:
    """fp32 partial sums [splits, num_slices, T, max_rank] of x @ A[slot].T per row."""
    t, k = x.shape
    num_slices, max_rank = len(lora_a), lora_a[0].shape[1]
    table = launch.slice_table(lora_a, lora_b, offsets)
    block_m, block_k = sgmv_block_m(t), 64 if k >= 64 else 32
    blocks = meta.blocks(block_m)
    splits, per_split = launch.split_k(k, block_k, blocks.shape[0] * num_slices, x.device)
    buf = torch.empty(splits, num_slices, t, max_rank, dtype=torch.float32, device=x.device)
    _sgmv_shrink_kernel[(blocks.shape[0], splits, num_slices)](
        x, x.stride(0), x.stride(1), table, blocks, meta.sorted_rows, ranks if ranks is not None else table,
        buf, t, k, max_rank, per_split, HAS_RANKS=ranks is not None, DOT_PRECISION=_precision(x),
        BLOCK_M=block_m, BLOCK_R=_block_r(max_rank), BLOCK_K=block_k)
    return buf


def expand(y: torch.Tensor, buf: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta,
           offsets: Sequence[int]) -> None:
    splits, num_slices, t, max_rank = buf.shape
    table = launch.slice_table(lora_a, lora_b, offsets)
    block_m, block_n = sgmv_block_m(t), 128
    blocks = meta.blocks(block_m)
    grid = (blocks.shape[0], triton.cdiv(max(b.shape[1] for b in lora_b), block_n), num_slices)
    _sgmv_expand_kernel[grid](
        y, y.stride(0), y.stride(1), buf, table, blocks, meta.sorted_rows,
        ranks if ranks is not None else table, scalings, t, max_rank, splits,
        HAS_RANKS=ranks is not None, DOT_PRECISION=_precision(y),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(max_rank))


def add_lora_sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                  lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor,
                  ranks: torch.Tensor | None, meta: LoRAMeta, offsets: Sequence[int]) -> None:
    buf = shrink(x, lora_a, lora_b, slot_ids, ranks, meta, offsets)
    expand(y, buf, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets)


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))  # tl.dot needs every dimension >= 16


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"
