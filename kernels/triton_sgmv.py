"""SGMV in Triton: rows grouped in segments that share a slot (LoRAMeta), one tile of a segment per
program, tensor-core dots; every slice of a merged projection in the same launch. Shrink writes fp32
partial sums per split of `in` (decode has too few rows to fill the GPU otherwise); expand sums them,
multiplies by B and the slot's scaling and adds into y.

A one-launch variant (each program repeating its rows' shrink before expanding its columns) was
measured on an H100 and dropped: the serial shrink made it 2-5x slower than two launches; so was one
with split shrink programs handing over to expand programs through per-group counters (1.2-5x slower).
Instead, triton_sgmv_pdl overlaps the second launch with the first (programmatic dependent launch)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.meta import LoRAMeta


@triton.jit
def _segment_rows(blocks_ptr, sorted_rows_ptr, pid_b, BLOCK_M: tl.constexpr):
    """The slot and the rows (original indices) of block pid_b; slot < 0 for unused blocks."""
    slot = tl.load(blocks_ptr + pid_b * 3)
    first = tl.load(blocks_ptr + pid_b * 3 + 1)
    end = tl.load(blocks_ptr + pid_b * 3 + 2)
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(sorted_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    return slot, rows, m_mask


@triton.jit
def slice_weights(slice_row, col, dtype, ALIGNED: tl.constexpr):
    """A stack's (pointer, strides) from the slice table at column col. The table is data, so the
    compiler knows nothing of them: ALIGNED (checked on the host) tells it that rows are contiguous and
    16-byte aligned, which turns the weight loads into 16-byte vector loads instead of one per element."""
    ptr = tl.load(slice_row + col).to(tl.pointer_type(dtype))
    s0, s1, s2 = tl.load(slice_row + col + 1), tl.load(slice_row + col + 2), tl.load(slice_row + col + 3)
    if ALIGNED:
        vec: tl.constexpr = 128 // dtype.primitive_bitwidth
        ptr, s0, s1, s2 = tl.multiple_of(ptr, 16), tl.multiple_of(s0, vec), tl.multiple_of(s1, vec), 1
    return ptr, s0, s1, s2


@triton.jit
def vector_bounds(slice_row, rank, dtype, ALIGNED: tl.constexpr):
    """The expand's mask bounds (rank, the slice's out size) and its column offset in y, declared whole
    vectors when ALIGNED so that B and y are read in 16-byte vectors: rank rounds up (B's columns past an
    adapter's rank are zero padding). Loaded here: a hint on a value computed by the caller is lost."""
    n_out, column = tl.load(slice_row + 8), tl.load(slice_row + 9)
    if ALIGNED:
        vec: tl.constexpr = 128 // dtype.primitive_bitwidth
        rank = tl.multiple_of((rank + vec - 1) // vec * vec, vec)
        n_out, column = tl.multiple_of(n_out, vec), tl.multiple_of(column, vec)
    return rank, n_out, column


@triton.jit
def shrink_tile(x_ptr, sx0, sx1, slice_row, slot, rows, m_mask, rank, k_lo, k_hi, K,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_R]: x[rows, k_lo:k_hi] @ A[slot, :rank, k_lo:k_hi].T"""
    a_ptr, sa0, sa1, sa2 = slice_weights(slice_row, 0, x_ptr.dtype.element_ty, ALIGNED)
    a_ptr += slot.to(tl.int64) * sa0
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * sx0 + offs_k[None, :] * sx1,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * sa1 + offs_k[:, None] * sa2,
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc += tl.dot(xt, at, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def expand_load(y_ptr, sy0, sy1, slice_row, slot, rows, m_mask, rank, offs_n, BLOCK_R: tl.constexpr,
                ALIGNED: tl.constexpr):
    """B[slot, offs_n, :rank] transposed, and the y tile it adds into (pointers, mask). Loaded before the
    rank vectors are summed, so these HBM reads overlap that work."""
    b_ptr, sb0, sb1, sb2 = slice_weights(slice_row, 4, y_ptr.dtype.element_ty, ALIGNED)
    b_ptr += slot.to(tl.int64) * sb0
    rank, n_out, column = vector_bounds(slice_row, rank, y_ptr.dtype.element_ty, ALIGNED)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < n_out
    bt = tl.load(b_ptr + offs_n[None, :] * sb1 + offs_r[:, None] * sb2,
                 mask=(offs_r < rank)[:, None] & n_mask[None, :], other=0.0)
    y_tile = y_ptr + rows[:, None] * sy0 + (column + offs_n)[None, :] * sy1
    return bt, y_tile, m_mask[:, None] & n_mask[None, :]


@triton.jit
def store_partials(buf_ptr, acc, split, j, T, R, rows, m_mask, BLOCK_R: tl.constexpr):
    """The shrink's fp32 [BLOCK_M, BLOCK_R] tile of these rows into buf[split, j] ([splits, slices, T, R])."""
    offs_r = tl.arange(0, BLOCK_R)
    out = buf_ptr + ((split * tl.num_programs(2) + j) * T + rows[:, None]) * R + offs_r[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def sum_partials(buf_ptr, j, T, R, rows, m_mask, rank, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_R]: the shrink's partial sums of slice j for these rows, added over its splits."""
    offs_r = tl.arange(0, BLOCK_R)
    t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for s in tl.static_range(SPLITS):  # unrolled: the partials' loads are all in flight at once
        part = buf_ptr + ((s * tl.num_programs(2) + j) * T + rows[:, None]) * R + offs_r[None, :]
        t += tl.load(part, mask=m_mask[:, None] & (offs_r[None, :] < rank), other=0.0)
    return t


@triton.jit
def expand_store(t, bt, y_tile, mask, y_old, DOT_PRECISION: tl.constexpr):
    """y tile += t @ bt, t already scaled."""
    acc = tl.dot(t.to(bt.dtype), bt, input_precision=DOT_PRECISION)
    tl.store(y_tile, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=mask)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, sx0, sx1, table_ptr, blocks_ptr, sorted_rows_ptr, ranks_ptr, buf_ptr,
                        T, K, R, k_per_split, HAS_RANKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                        ALIGNED: tl.constexpr):
    if PDL:  # the expand may start now: it waits for this launch before it reads the partials
        tl.extra.cuda.gdc_launch_dependents()
    pid_b, pid_k, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, rows, m_mask = _segment_rows(blocks_ptr, sorted_rows_ptr, pid_b, BLOCK_M)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
    k_lo = pid_k * k_per_split
    acc = shrink_tile(x_ptr, sx0, sx1, table_ptr + j * 10, slot, rows, m_mask, rank, k_lo,
                      tl.minimum(k_lo + k_per_split, K), K, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K, ALIGNED)
    store_partials(buf_ptr, acc, pid_k, j, T, R, rows, m_mask, BLOCK_R)


@triton.jit
def _sgmv_expand_kernel(y_ptr, sy0, sy1, buf_ptr, table_ptr, blocks_ptr, sorted_rows_ptr, ranks_ptr,
                        scalings_ptr, T, R, SPLITS: tl.constexpr, HAS_RANKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
                        AFTER_GEMM: tl.constexpr, ALIGNED: tl.constexpr):
    pid_b, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slice_row = table_ptr + j * 10
    n_out = tl.load(slice_row + 8)
    slot, rows, m_mask = _segment_rows(blocks_ptr, sorted_rows_ptr, pid_b, BLOCK_M)
    if (slot < 0) | (pid_n * BLOCK_N >= n_out):
        return
    rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
    bt, y_tile, mask = expand_load(y_ptr, sy0, sy1, slice_row, slot, rows, m_mask, rank,
                                   pid_n * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_R, ALIGNED)
    if PDL:  # B and y (written before the shrink started) are loaded; the partials need the shrink done
        y_old = tl.load(y_tile, mask=mask, other=0.0)
        tl.extra.cuda.gdc_wait()
    if AFTER_GEMM:  # the dependent of the GEMM that writes y: B is loaded; y and the partials wait for it
        tl.extra.cuda.gdc_wait()
    if not PDL:
        y_old = tl.load(y_tile, mask=mask, other=0.0)
    t = sum_partials(buf_ptr, j, T, R, rows, m_mask, rank, SPLITS, BLOCK_M, BLOCK_R)
    expand_store(t * tl.load(scalings_ptr + slot), bt, y_tile, mask, y_old, DOT_PRECISION)


class Plan:
    """Tile sizes and splits for one call shape, from T and the slot count only (no device sync)."""

    def __init__(self, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                 meta: LoRAMeta, offsets: Sequence[int], beside_gemm: bool = False) -> None:
        t, self.k = x.shape
        num_slices, self.max_rank = len(lora_a), lora_a[0].shape[1]
        self.max_out = max(b.shape[1] for b in lora_b)
        # Rows per program: 16 at decode sizes (measured best up to T=256), else about the rows per
        # slot, so that short prefill segments do not leave tiles half empty.
        per_slot = -(-t // max(1, min(t, meta.max_adapters)))
        self.block_m = 16 if t <= 256 else min(64, max(16, triton.next_power_of_2(per_slot)))
        self.block_r, self.block_k = dot_blocks(self.max_rank)
        self.block_n = 128
        self.shrink_warps, self.expand_warps = 4, 4
        self.num_stages = 3
        self.pdl = False
        # linear_lora: the expand is launched as the programmatic dependent of a GEMM that triggers early
        # (kernels.triton_linear), so its launch and its B loads overlap the GEMM.
        self.after_gemm = False
        self.aligned = weights_aligned(lora_a, lora_b, offsets)
        self.blocks = meta.blocks(self.block_m)
        # Shrink splits of `in`: each program's K loop is short, so many programs keep loads in flight.
        per_sm, max_splits = 16, 16
        if t <= 256:
            # Decode, measured on an H100 (T=64-128, 8-64 adapters, rank 16 and 64, the Llama-3-8B
            # projections): the shrink is within 5% of its best tile at 8 to 32 programs per SM, but the
            # expand reads every split's partials, so fewer splits pay there (8 instead of 16 splits: T=64
            # over 64 adapters, gate/up 47.5 -> 34.4 us). The expand's tile moves about 16 KB of B.
            self.block_k, self.shrink_warps, self.num_stages, per_sm = 128, 2, 4, 8
            self.block_n = min(512, max(128, 8192 // self.block_r))
            self.expand_warps = 8 if self.block_n >= 256 else 4
            if beside_gemm and sum(b.shape[1] for b in lora_b) > self.k:
                # linear_lora: the shrink runs beside the base GEMM, hidden, and the step waits for the
                # expand. Where B outweighs A (q/k/v, gate/up) fewer partials for the expand pay (H100, T=64,
                # GEMM + LoRA over 8 / 32 adapters: gate/up 10.8 / 22.5 -> 9.8 / 19.8 us over the GEMM alone,
                # q/k/v 8.9 / 13.1 -> 8.0 / 12.9); o and down need their many splits to finish the shrink in time.
                max_splits = 4
        self.splits, self.k_per_split = launch.split_k(self.k, self.block_k, self.blocks.shape[0] * num_slices,
                                                       x.device, per_sm=per_sm, max_splits=max_splits)


def dot_blocks(max_rank: int) -> tuple[int, int]:
    """(rank block, k block) of a tensor-core tile: tl.dot needs dimensions of 16 at least; k steps of 128
    up to rank 32, of 64 above."""
    block_r = max(16, triton.next_power_of_2(max_rank))
    return block_r, 128 if block_r <= 32 else 64


def weights_aligned(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], offsets: Sequence[int]) -> bool:
    """The kernels' ALIGNED: every stack, slice offset and out size allows 16-byte vector loads."""
    vec = 16 // lora_a[0].element_size()
    return launch.vector_aligned(*lora_a, *lora_b) and all(
        n % vec == 0 for n in (*offsets, *(b.shape[1] for b in lora_b)))


def shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta, offsets: Sequence[int],
           plan: Plan | None = None) -> torch.Tensor:
    """fp32 partial sums [splits, num_slices, T, max_rank] of x @ A[slot].T per row."""
    plan = plan or Plan(x, lora_a, lora_b, meta, offsets)
    table = launch.slice_table(lora_a, lora_b, offsets)
    t, num_slices = x.shape[0], len(lora_a)
    buf = torch.empty(plan.splits, num_slices, t, plan.max_rank, dtype=torch.float32, device=x.device)
    _sgmv_shrink_kernel[(plan.blocks.shape[0], plan.splits, num_slices)](
        x, x.stride(0), x.stride(1), table, plan.blocks, meta.sorted_rows, ranks if ranks is not None else table,
        buf, t, plan.k, plan.max_rank, plan.k_per_split, HAS_RANKS=ranks is not None,
        DOT_PRECISION=dot_precision(x), BLOCK_M=plan.block_m, BLOCK_R=plan.block_r, BLOCK_K=plan.block_k,
        PDL=plan.pdl, ALIGNED=plan.aligned, num_warps=plan.shrink_warps, num_stages=plan.num_stages)
    return buf


def expand(y: torch.Tensor, buf: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta,
           offsets: Sequence[int], plan: Plan | None = None) -> None:
    plan = plan or Plan(y, lora_a, lora_b, meta, offsets)
    table = launch.slice_table(lora_a, lora_b, offsets)
    splits, num_slices, t, max_rank = buf.shape
    _sgmv_expand_kernel[(plan.blocks.shape[0], triton.cdiv(plan.max_out, plan.block_n), num_slices)](
        y, y.stride(0), y.stride(1), buf, table, plan.blocks, meta.sorted_rows,
        ranks if ranks is not None else table, scalings, t, max_rank, SPLITS=splits, HAS_RANKS=ranks is not None,
        DOT_PRECISION=dot_precision(y), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_R=plan.block_r,
        PDL=plan.pdl, AFTER_GEMM=plan.after_gemm, ALIGNED=plan.aligned, launch_pdl=plan.pdl or plan.after_gemm,
        num_warps=plan.expand_warps,
        num_stages=plan.num_stages)


def add_lora_sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                  lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor,
                  ranks: torch.Tensor | None, meta: LoRAMeta, offsets: Sequence[int], *, pdl: bool = False) -> None:
    plan = Plan(x, lora_a, lora_b, meta, offsets)
    plan.pdl = pdl and launch.supports_pdl(x.device)
    buf = shrink(x, lora_a, lora_b, slot_ids, ranks, meta, offsets, plan)
    expand(y, buf, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets, plan)


def add_lora_sgmv_pdl(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                      lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor,
                      ranks: torch.Tensor | None, meta: LoRAMeta, offsets: Sequence[int]) -> None:
    """triton_sgmv with the expand launched as a programmatic dependent launch (Hopper and later): it
    starts while the shrink runs and loads its B and y tiles, hiding most of a second launch."""
    add_lora_sgmv(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets, pdl=True)


def dot_precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"
