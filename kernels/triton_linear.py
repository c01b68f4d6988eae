"""The decode GEMM in Triton: y = x @ W.T for a few rows, one tile of rows per program and the columns as
the grid, so W streams from memory once. At decode sizes it beats cuBLAS on the Llama-3-8B projections
(H100, 64 rows, graph replays over 8 distinct weights: q/k/v 21.9 vs 21.1 us, o 15.5 vs 15.8, gate/up 84.4
vs 87.9, down 45.2 vs 47.9; a layer's four 164.9 vs 171.7), and both base-only and LoRA steps use it.

Measured and dropped: the LoRA expand in this GEMM's epilogue (the shrink launched first, the GEMM as its
programmatic dependent, every program adding its columns' delta over the batch's slots before its store).
Per layer at T=64 over 8 adapters it was 190.5 us against 191.3 for this GEMM with the side-stream shrink
and the separate expand, and slower elsewhere: 250.6 vs 245.8 over 64 adapters, 198.6 vs 183.5 at T=8."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch

MAX_ROWS = 64  # at 128 rows cuBLAS was faster (H100, a layer's four projections: 180 vs 233 us)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The shapes this kernel takes: 16-bit x [1..MAX_ROWS, K] and W [N, K], both contiguous."""
    return (x.dtype in (torch.float16, torch.bfloat16) and 0 < x.shape[0] <= MAX_ROWS and x.is_contiguous()
            and weight.is_contiguous())


@triton.jit
def _linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # a programmatic dependent (linear_lora's expand) may start now; it waits for y before reading it
        tl.extra.cuda.gdc_launch_dependents()
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k + tl.arange(0, BLOCK_K)
        x_mask, w_mask = m_mask[:, None], n_mask[None, :]
        if not EVEN_K:
            x_mask, w_mask = x_mask & (offs_k < K)[None, :], w_mask & (offs_k < K)[:, None]
        xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=x_mask, other=0.0)
        wt = tl.load(w_cols + offs_k[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(xt, wt, acc)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ weight.T (out: contiguous [M, N]); the caller checked supports()."""
    m, k = x.shape
    n = weight.shape[0]
    block_m, block_n, block_k, stages = _config(m, n, x.device)
    _linear_kernel[(triton.cdiv(n, block_n),)](x, weight, out, m, n, k, BLOCK_M=block_m, BLOCK_N=block_n,
                                               BLOCK_K=block_k, STAGES=stages, EVEN_K=k % block_k == 0,
                                               PDL=launch.supports_pdl(x.device), num_warps=4)


def _config(m: int, n: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages), the best of a sweep on an H100 (column tiles of 32-128, K steps of
    128-256, 3-6 stages, 4 or 8 warps, pointer loads or tensor descriptors) for the four projections: the
    widest column tile that still gives about one program per SM, and as many stages as fit in shared
    memory."""
    block_m = max(16, triton.next_power_of_2(m))
    sms = launch.num_programs_target(device, per_sm=1)
    block_n = next((b for b in (128, 64) if triton.cdiv(n, b) >= 0.7 * sms), 32)
    block_k = 128
    stages = max(2, min(6, 150_000 // ((block_m + block_n) * block_k * 2)))
    return block_m, block_n, block_k, stages
