"""Paged decode attention: one query token per sequence against that sequence's keys in the paged KV
cache, found through its block table. The PyTorch reference gathers each sequence's keys; the Triton
kernel reads them in place, one program per (sequence, kv head, split) covering the whole GQA group of
query heads (each key is read once). Long contexts are cut into splits (flash-decoding): each program
writes a partial softmax (max, sum, weighted values) and a second small kernel combines them. Grid and
scratch depend on shapes only, so a call can be captured in a CUDA graph."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.checks import FLOAT_DTYPES, check_op_backend, describe, use_triton

MIN_TRITON_HEAD_DIM = 16  # tl.dot needs 16 along the reduced dimension; other sizes are masked
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, block_size: int,
                           scale: float, backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * q[b, h] · K_bᵀ) · V_b for every sequence b and query head h, where K_b, V_b are the
    first context_lens[b] tokens of sequence b (token t at slot block_tables[b, t // block_size] *
    block_size + t % block_size of kv head h // (Hq // Hkv)). q [B, Hq, D]; k_cache, v_cache
    [num_cache_slots, Hkv, D]; returns [B, Hq, D] in q's dtype (into out if given). A sequence with no
    keys gets zeros. Checks are structural only (no device sync)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, backend, out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] > 0:
        run = attention_triton if use_triton(backend, q) else _attention_torch
        run(q, k_cache, v_cache, block_tables, context_lens, block_size, float(scale), out)
    return out


def _attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor) -> None:
    """The reference: per sequence, gather its keys and values in order and attend in fp32."""
    group = q.shape[1] // k_cache.shape[1]
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        values = v_cache[slots].float().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale).softmax(dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, values).nan_to_num_(0.0)  # n == 0: softmax of nothing


# --- Triton -------------------------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(q_ptr, sq0, sq1, k_ptr, v_ptr, sk0, sk1, tables_ptr, st0, lens_ptr, out_ptr, so0, so1,
                   part_m_ptr, part_l_ptr, part_acc_ptr, scale_log2, block_size,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Each sequence's own tiles are divided among the splits: a short context leaves late splits empty.
    ctx = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), SPLITS) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_g, offs_d, offs_n = tl.arange(0, GROUP_PAD), tl.arange(0, D_PAD), tl.arange(0, BLOCK_N)
    g_mask, d_mask = offs_g < GROUP, offs_d < D
    heads = kv_head * GROUP + offs_g
    qg = tl.load(q_ptr + b.to(tl.int64) * sq0 + heads[:, None] * sq1 + offs_d[None, :],
                 mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    denom = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = tables_ptr + b.to(tl.int64) * st0
    for n0 in range(start, end, BLOCK_N):
        t = n0 + offs_n
        t_mask = t < end  # table entries past the context are never read
        block = tl.load(table + t // block_size, mask=t_mask, other=0)
        slot = block.to(tl.int64) * block_size + t % block_size
        kv_off = slot[:, None] * sk0 + kv_head * sk1 + offs_d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(qg, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds at least one key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    if SPLITS == 1:
        o = acc / tl.where(denom > 0, denom, 1.0)[:, None]  # no keys: acc is 0, so is the output
        tl.store(out_ptr + b.to(tl.int64) * so0 + heads[:, None] * so1 + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        row = (b * (tl.num_programs(1) * GROUP) + heads).to(tl.int64) * SPLITS + split  # [B, Hq, SPLITS]
        tl.store(part_m_ptr + row, m, mask=g_mask)
        tl.store(part_l_ptr + row, denom, mask=g_mask)
        tl.store(part_acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, so0, so1,
                    D: tl.constexpr, D_PAD: tl.constexpr, SPLITS: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s, offs_d = tl.arange(0, SPLITS), tl.arange(0, D_PAD)
    d_mask = offs_d < D
    row = (b * tl.num_programs(1) + h).to(tl.int64) * SPLITS + offs_s
    m = tl.load(part_m_ptr + row)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no keys at all: every weight below is 0
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.sum(tl.load(part_l_ptr + row) * w, axis=0)
    acc = tl.load(part_acc_ptr + row[:, None] * D + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * so0 + h * so1 + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: few programs, so small test batches still exercise the splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_n(head_dim: int) -> int:
    """Keys per loop iteration: a [BLOCK_N, D] tile of K and of V stays in registers."""
    return 32 if head_dim > 128 else 64


def num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, head_dim: int,
               device: torch.device, keys_per_tile: int | None = None) -> int:
    """From shapes only (static for a CUDA graph): split the keys when (sequence, kv head) programs alone
    would leave SMs idle, into at most as many parts as the longest possible context has tiles."""
    programs = max(1, batch * num_kv_heads)
    sms = _num_sms(device)
    if programs >= sms:
        return 1
    tiles = max(1, -(-max_blocks * block_size // (keys_per_tile or block_n(head_dim))))
    want = min(-(-2 * sms // programs), tiles, _MAX_SPLITS)
    return triton.next_power_of_2(want) if want > 1 else 1


def attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor, *,
                     keys_per_tile: int | None = None, num_warps: int = 4, num_stages: int = 2) -> None:
    """The Triton path on checked arguments; the keyword arguments are the launch configuration, which
    benchmarks/paged_attention.py sweeps."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    keys_per_tile = keys_per_tile or block_n(head_dim)
    splits = num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, head_dim, q.device, keys_per_tile)
    if splits > 1:
        part_m = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    _decode_kernel[(batch, num_kv_heads, splits)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        block_tables, block_tables.stride(0), context_lens, out, out.stride(0), out.stride(1),
        part_m, part_l, part_acc, scale * _LOG2E, block_size,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=head_dim, D_PAD=d_pad,
        BLOCK_N=keys_per_tile, SPLITS=splits, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _combine_kernel[(batch, num_heads)](part_m, part_l, part_acc, out, out.stride(0), out.stride(1),
                                            D=head_dim, D_PAD=d_pad, SPLITS=splits, num_warps=4)


# --- argument checks (host-only: shapes, dtypes, devices) ---------------------------------------------------

def _check(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, backend, out) -> None:
    check_op_backend(backend)
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: expected a [B, Hq, D] float16/bfloat16/float32 tensor, got {describe(q)}")
    if q.stride(-1) != 1:
        raise ValueError(f"q: the last dimension must be contiguous, got strides {q.stride()}")
    batch, num_heads, head_dim = q.shape
    if head_dim < MIN_TRITON_HEAD_DIM and use_triton(backend, q):
        raise ValueError(f"q: the triton backend needs a head dim >= {MIN_TRITON_HEAD_DIM}, got {head_dim}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (not isinstance(c, torch.Tensor) or c.dim() != 3 or c.dtype != q.dtype or c.device != q.device
                or c.shape[2] != head_dim or not c.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous [num_cache_slots, Hkv, {head_dim}] {q.dtype} tensor "
                             f"on {q.device}, got {describe(c)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    num_kv_heads = k_cache.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"k_cache: query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if (not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2 or block_tables.dtype != torch.int32
            or block_tables.shape[0] != batch or block_tables.device != q.device):
        raise ValueError(f"block_tables: expected an int32 [{batch}, max_blocks] tensor on {q.device}, "
                         f"got {describe(block_tables)}")
    if (not isinstance(context_lens, torch.Tensor) or context_lens.dtype != torch.int32
            or context_lens.shape != (batch,) or context_lens.device != q.device):
        raise ValueError(f"context_lens: expected an int32 [{batch}] tensor on {q.device}, "
                         f"got {describe(context_lens)}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale: expected a positive float, got {scale!r}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"out: expected a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} with a "
                         f"contiguous last dimension, got {describe(out)}")
