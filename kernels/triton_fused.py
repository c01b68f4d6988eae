"""SGMV in one launch (decode sizes): a launch costs ~5 us of a CUDA-graph replay even with nothing to
move, so shrink and expand share one. Per group (one block of rows of one segment, one slice) SPLITS
programs each shrink one part of `in` into fp32 partials and count themselves in; EXPANDERS programs
each load their tile of B and of y first (HBM latency hidden behind the shrink), wait for that count,
sum the partials in a fixed order (deterministic, unlike float atomics) and add into y.

A program takes its role in its group from a ticket (an atomic counter of the group) when it starts,
not from its grid index: shrink roles go to the first programs of the group to start. A waiting program
therefore waits only on programs that started before it and never wait themselves: no deadlock, whatever
the grid size or the order in which the GPU (or Triton's interpreter, one program at a time) starts
programs. The last program of a group resets the group's counters, so they are zero between launches
(CUDA-graph capturable). The counters are per device: calls on one device come from one stream at a
time (as the engine's do)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.meta import LoRAMeta
from kernels.triton_sgmv import Plan, _expand_load, _expand_store, _precision, _segment_rows, _shrink_tile

MAX_EXPANDERS = 32  # per group


@triton.jit
def _fused_kernel(x_ptr, sx0, sx1, y_ptr, sy0, sy1, part_ptr, counters_ptr, table_ptr, blocks_ptr,
                  sorted_rows_ptr, ranks_ptr, scalings_ptr, K, R, k_per_split, num_blocks,
                  SPLITS: tl.constexpr, EXPANDERS: tl.constexpr, HAS_RANKS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    group = tl.program_id(1)
    pid_b, j = group % num_blocks, group // num_blocks
    slot, rows, m_mask = _segment_rows(blocks_ptr, sorted_rows_ptr, pid_b, BLOCK_M)
    if slot < 0:  # the whole group leaves before touching its counters
        return
    slice_row = table_ptr + j * 10
    rank = tl.load(ranks_ptr + slot) if HAS_RANKS else R
    tickets, arrived = counters_ptr + 3 * group, counters_ptr + 3 * group + 1
    offs_m, offs_r = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_R)
    parts = part_ptr + (group * SPLITS * BLOCK_M + offs_m[:, None]) * BLOCK_R + offs_r[None, :]
    role = tl.atomic_add(tickets, 1)
    if role < SPLITS:
        k_lo = role * k_per_split
        acc = _shrink_tile(x_ptr, sx0, sx1, slice_row, slot, rows, m_mask, rank, k_lo,
                           tl.minimum(k_lo + k_per_split, K), K, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
        tl.store(parts + role * BLOCK_M * BLOCK_R, acc)
        tl.debug_barrier()  # every thread's partial is stored before the count says so
        tl.atomic_add(arrived, 1, sem="release")
    else:
        bt, y_tile, mask, y_old = _expand_load(y_ptr, sy0, sy1, slice_row, slot, rows, m_mask, rank,
                                               (role - SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N),
                                               tl.load(slice_row + 8), BLOCK_R)
        while tl.load(arrived, volatile=True) < SPLITS:
            pass
        tl.atomic_add(arrived, 0, sem="acquire")
        tl.debug_barrier()
        t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for s in range(SPLITS):
            t += tl.load(parts + s * BLOCK_M * BLOCK_R, cache_modifier=".cg")  # L2: written by other SMs
        _expand_store(t * tl.load(scalings_ptr + slot), bt, y_tile, mask, y_old, DOT_PRECISION)
        if tl.atomic_add(counters_ptr + 3 * group + 2, 1) == EXPANDERS - 1:  # the group's last program
            tl.atomic_xchg(tickets, 0)
            tl.atomic_xchg(arrived, 0)
            tl.atomic_xchg(counters_ptr + 3 * group + 2, 0)


_counters: dict[torch.device, torch.Tensor] = {}


def _counters_for(device: torch.device, num_groups: int) -> torch.Tensor:
    """int32 zeros, (tickets, arrived, departed) per group; the kernel leaves them zero."""
    c = _counters.get(device)
    if c is None or c.numel() < 3 * num_groups:
        c = torch.zeros(3 * max(num_groups, 4096), dtype=torch.int32, device=device)
        _counters[device] = c
    return c


def add_lora_fused(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                   lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor,
                   ranks: torch.Tensor | None, meta: LoRAMeta, offsets: Sequence[int]) -> None:
    plan = Plan(x, lora_a, lora_b, meta)
    # One column tile per expander, at most MAX_EXPANDERS per group: wide outputs get wider tiles.
    plan.block_n = max(plan.block_n, triton.next_power_of_2(triton.cdiv(plan.max_out, MAX_EXPANDERS)))
    plan.num_warps = 4 if plan.block_n <= 128 else 8
    expanders = triton.cdiv(plan.max_out, plan.block_n)
    num_blocks, num_slices = plan.blocks.shape[0], len(lora_a)
    num_groups = num_blocks * num_slices
    table = launch.slice_table(lora_a, lora_b, offsets)
    parts = torch.empty(num_groups * plan.splits * plan.block_m * plan.block_r, dtype=torch.float32,
                        device=x.device)
    _fused_kernel[(plan.splits + expanders, num_groups)](
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), parts, _counters_for(x.device, num_groups),
        table, plan.blocks, meta.sorted_rows, ranks if ranks is not None else table, scalings, plan.k,
        plan.max_rank, plan.k_per_split, num_blocks, SPLITS=plan.splits, EXPANDERS=expanders,
        HAS_RANKS=ranks is not None, DOT_PRECISION=_precision(x), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, num_warps=plan.num_warps)
