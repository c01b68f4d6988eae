"""The decoder layer's small ops, fused: RMSNorm (with the residual add), rotary embedding in place on q and
k, and silu(gate) * up. Each has one PyTorch reference (the eager lines of transformers' Llama) and one
Triton kernel that computes in fp32 and rounds to the tensor dtype exactly where the eager ops do, so
the two agree to the bit but for the order of a sum (RMSNorm's mean) and the last ulp of a transcendental.
Checks are host-only and grids come from shapes, so every call can be captured in a CUDA graph."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.checks import FLOAT_DTYPES, check_op_backend, describe, use_triton

MAX_HIDDEN = 32768  # one row of RMSNorm is one block in registers
MAX_HEAD_DIM = 512


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """h = x if residual is None else (x + residual) rounded to x.dtype; returns (RMSNorm(h) * weight, h).
    x, residual [T, H] (row stride arbitrary, last dim contiguous); weight [H] in x's dtype. Both outputs
    are fresh contiguous tensors, but h is x itself when there is no residual."""
    _check_rms_norm(x, weight, eps, residual, backend)
    if use_triton(backend, x):
        return _rms_norm_triton(x, weight, float(eps), residual)
    return _rms_norm_torch(x, weight, float(eps), residual)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
            backend: str = "auto") -> None:
    """In place: q = q*cos + rotate_half(q)*sin, the same for k. q [T, Hq, D], k [T, Hk, D] (arbitrary row
    and head strides, last dim contiguous: views into one qkv tensor); cos, sin [T, D] in q's dtype."""
    _check_rotary(q, k, cos, sin, backend)
    if use_triton(backend, q):
        _rotary_triton(q, k, cos, sin)
    else:
        _rotary_torch(q, k, cos, sin)


def silu_and_mul(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """gate_up [T, 2I] (gate first, then up; row stride arbitrary, last dim contiguous) -> silu(gate) * up,
    a fresh contiguous [T, I] tensor."""
    _check_silu_and_mul(gate_up, backend)
    if use_triton(backend, gate_up):
        return _silu_and_mul_triton(gate_up)
    return _silu_and_mul_torch(gate_up)


# --- the references: transformers' Llama lines, eager --------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


def _rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    cos, sin = cos[:, None, :], sin[:, None, :]
    for t in (q, k):
        t.copy_(t * cos + rotate_half(t) * sin)


def _silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# --- Triton ---------------------------------------------------------------------------------------------------
# Loads are widened to fp32 and every result the eager code rounds is rounded here too (`.to(dtype)`), so
# a 16-bit product or sum is computed exactly as PyTorch computes it. enable_fp_fusion=False at launch keeps
# the compiler from contracting a multiply and an add into an FMA, which eager PyTorch never does.

@triton.jit
def _rms_norm_kernel(x_ptr, sx, res_ptr, sr, w_ptr, out_ptr, h_ptr, hidden, hidden_f, eps,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(dtype)
        tl.store(h_ptr + row * hidden + cols, h, mask=mask)
        x = h.to(tl.float32)
    mean_sq = tl.div_rn(tl.sum(x * x, axis=0), hidden_f)  # torch's CPU mean: sum / H
    normed = (x * tl.rsqrt(mean_sq + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (w * normed).to(dtype), mask=mask)


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    h = x if residual is None else torch.empty_like(out)
    if rows:
        block = triton.next_power_of_2(hidden)
        res = x if residual is None else residual  # unused without a residual
        _rms_norm_kernel[(rows,)](x, x.stride(0), res, res.stride(0), weight, out, h, hidden, float(hidden),
                                  eps, BLOCK=block, HAS_RESIDUAL=residual is not None,
                                  num_warps=min(16, max(1, block // 512)), enable_fp_fusion=False)
    return out, h


@triton.jit
def _rotate_heads(base, head_stride, num_heads, half, cols, col_mask, c1, c2, s1, s2,
                  HEADS: tl.constexpr):
    """One token's heads, in place: the first half of each head, then the second (rotate_half's order)."""
    heads = tl.arange(0, HEADS)
    mask = (heads < num_heads)[:, None] & col_mask[None, :]
    first = base + heads[:, None] * head_stride + cols[None, :]
    dtype = base.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    # eager: q*cos rounded, rotate_half(q)*sin rounded (rotate_half = [-x2, x1]), their sum rounded
    o1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    tl.store(first, o1.to(dtype), mask=mask)
    tl.store(first + half, o2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, sq0, sq1, k_ptr, sk0, sk1, cos_ptr, sc, sin_ptr, ss, num_q_heads, num_k_heads, half,
                   HALF: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)
    col_mask = cols < half
    c1 = tl.load(cos_ptr + t * sc + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * sc + half + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * ss + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * ss + half + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * sq0, sq1, num_q_heads, half, cols, col_mask, c1, c2, s1, s2, HEADS=Q_HEADS)
    _rotate_heads(k_ptr + t * sk0, sk1, num_k_heads, half, cols, col_mask, c1, c2, s1, s2, HEADS=K_HEADS)


def _rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    tokens, num_q_heads, head_dim = q.shape
    if tokens == 0:
        return
    half = head_dim // 2
    # one program per token: cos/sin read once for all its q and k heads
    _rotary_kernel[(tokens,)](q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), cos, cos.stride(0),
                              sin, sin.stride(0), num_q_heads, k.shape[1], half,
                              HALF=triton.next_power_of_2(half), Q_HEADS=triton.next_power_of_2(num_q_heads),
                              K_HEADS=triton.next_power_of_2(k.shape[1]), num_warps=4, enable_fp_fusion=False)


@triton.jit
def _silu_and_mul_kernel(x_ptr, sx, out_ptr, inter, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * sx + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # eager silu is x / (1 + exp(-x)) with an IEEE division and, on CUDA, libdevice's expf (the
    # interpreter has no libdevice: numpy's exp); silu(gate) is rounded before the multiply
    e = libdevice.exp(-gate) if LIBDEVICE_EXP else tl.exp(-gate)
    silu = tl.div_rn(gate, 1.0 + e).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (silu * up).to(dtype), mask=mask)


_SILU_BLOCK = 1024


def _silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows and inter:
        block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            gate_up, gate_up.stride(0), out, inter, BLOCK=block, LIBDEVICE_EXP=gate_up.is_cuda,
            num_warps=4, enable_fp_fusion=False)
    return out


# --- argument checks (host-only: shapes, dtypes, devices) ---------------------------------------------------

def _is_rows(t: object, ndim: int) -> bool:
    """A float tensor of ndim dims whose last dim is contiguous."""
    return (isinstance(t, torch.Tensor) and t.dim() == ndim and t.dtype in FLOAT_DTYPES
            and (t.shape[-1] <= 1 or t.stride(-1) == 1))


def _check_rms_norm(x, weight, eps, residual, backend) -> None:
    check_op_backend(backend)
    if not _is_rows(x, 2):
        raise ValueError("x: expected a [T, H] float16/bfloat16/float32 tensor with a contiguous last dim, "
                         f"got {describe(x)}{_strides(x)}")
    hidden = x.shape[1]
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"x: hidden size must lie in [1, {MAX_HIDDEN}], got {hidden}")
    if (not isinstance(weight, torch.Tensor) or weight.shape != (hidden,) or weight.dtype != x.dtype
            or weight.device != x.device or not weight.is_contiguous()):
        raise ValueError(f"weight: expected a contiguous [{hidden}] {x.dtype} tensor on {x.device}, "
                         f"got {describe(weight)}")
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if residual is not None and (not _is_rows(residual, 2) or residual.shape != x.shape
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual: expected a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device} with a "
                         f"contiguous last dim, got {describe(residual)}{_strides(residual)}")


def _check_rotary(q, k, cos, sin, backend) -> None:
    check_op_backend(backend)
    if not _is_rows(q, 3):
        raise ValueError("q: expected a [T, Hq, D] float16/bfloat16/float32 tensor with a contiguous last dim, "
                         f"got {describe(q)}{_strides(q)}")
    tokens, _, head_dim = q.shape
    if head_dim % 2 or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be even and in [2, {MAX_HEAD_DIM}], got {head_dim}")
    if not _is_rows(k, 3) or k.shape[0] != tokens or k.shape[2] != head_dim or k.dtype != q.dtype \
            or k.device != q.device:
        raise ValueError(f"k: expected a {q.dtype} [{tokens}, Hk, {head_dim}] tensor on {q.device} with a "
                         f"contiguous last dim, got {describe(k)}{_strides(k)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not _is_rows(t, 2) or t.shape != (tokens, head_dim) or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected a {q.dtype} [{tokens}, {head_dim}] tensor on {q.device} with a "
                             f"contiguous last dim, got {describe(t)}{_strides(t)}")


def _check_silu_and_mul(gate_up, backend) -> None:
    check_op_backend(backend)
    if not _is_rows(gate_up, 2) or gate_up.shape[1] % 2:
        raise ValueError("gate_up: expected a [T, 2I] float16/bfloat16/float32 tensor (even last dim, "
                         f"contiguous) got {describe(gate_up)}{_strides(gate_up)}")


def _strides(t: object) -> str:
    return f" with strides {t.stride()}" if isinstance(t, torch.Tensor) else ""
