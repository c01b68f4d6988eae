"""kernels.rms_norm / rotary_ / silu_and_mul: the torch references against transformers' own Llama modules
(bit-equal), and the Triton kernels against the references on fresh random inputs (CPU: Triton's
interpreter, fp32 and fp16; KERNELS_TEST_DEVICE=cuda runs the same on a GPU, with bf16 too)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from kernels import rms_norm, rotary_, silu_and_mul

DEVICE = os.environ.get("KERNELS_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
DTYPES = (torch.float32, torch.float16, *((torch.bfloat16,) if ON_GPU else ()))
dtype_ids = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))

# How far the Triton kernels may be from the references, in ulps of the dtype. The only differences come
# from fp32 internals: the order of RMSNorm's sum of squares and the exp inside silu. In 16-bit dtypes they
# show at most at the one rounding where fp32 meets the dtype (the normalized row, silu(gate)): 1 ulp; the
# multiply by the weight (or up) that follows is exact and then rounded, so it can widen a 1-ulp input
# difference to 2 ulps of its output. In fp32 nothing rounds the internal differences away: a few ulps.
AT_ROUNDING = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1}
AFTER_MULTIPLY = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between same-dtype floats in units in the last place: how many representable values
    apart they lie (the bit patterns mapped onto one monotone integer line)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_type = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    magnitude = 2 ** (8 * a.element_size() - 1) - 1

    def line(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(int_type).long()
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return (line(a.cpu()) - line(b.cpu())).abs()


def assert_ulps(got: torch.Tensor, want: torch.Tensor, max_ulps: int, what: str) -> None:
    """At most max_ulps of the dtype apart everywhere and, in 16-bit dtypes, mostly bit-equal (in fp32 one
    row's sum of squares a bit off moves that whole row by an ulp or so)."""
    dist = ulps(got, want)
    assert dist.max() <= max_ulps, f"{what}: {int(dist.max())} ulps of {got.dtype} apart (at most {max_ulps})"
    equal = (dist == 0).float().mean().item()
    assert got.dtype == torch.float32 or equal >= 0.95, f"{what}: only {equal:.1%} bit-equal"


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def rows_of_wider(rows: int, hidden: int, g: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """[rows, hidden] columns 3.. of a wider tensor: the row stride is not hidden, as for slices of qkv."""
    return randn(rows, hidden + 11, g=g, dtype=dtype, scale=scale)[:, 3:3 + hidden]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own cos/sin for these positions ([T, D], in dtype), llama3 frequency scaling."""
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=8192,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 1024})
    rotary = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=dtype)
    cos, sin = rotary(x, positions[None].cpu())
    return cos[0].to(DEVICE), sin[0].to(DEVICE)


# --- the references against transformers --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_references_match_transformers(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    tokens, hidden, eps = 6, 96, 1e-5
    x, res = randn(tokens, hidden, g=g, dtype=dtype, scale=3), randn(tokens, hidden, g=g, dtype=dtype)
    norm = LlamaRMSNorm(hidden, eps=eps).to(DEVICE)
    norm.weight.data = randn(hidden, g=g, dtype=dtype)
    out, h = rms_norm(x, norm.weight.data, eps, backend="torch")
    assert torch.equal(out, norm(x)) and h is x
    out, h = rms_norm(x, norm.weight.data, eps, res, backend="torch")
    assert torch.equal(h, x + res) and torch.equal(out, norm(x + res))

    q, k = randn(tokens, 4, 32, g=g, dtype=dtype), randn(tokens, 2, 32, g=g, dtype=dtype)
    cos, sin = rope_cos_sin(torch.randint(0, 8000, (tokens,), generator=g), 32, dtype)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    rotary_(q, k, cos, sin, backend="torch")
    assert torch.equal(q, want_q) and torch.equal(k, want_k)

    gate_up = randn(tokens, 2 * 80, g=g, dtype=dtype, scale=4)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul(gate_up, backend="torch"), ACT2FN["silu"](gate) * up)


# --- Triton against the references --------------------------------------------------------------------------

@dtype_ids
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("hidden", [250, 512])  # a non-power-of-2 hidden size and a power of 2
def test_rms_norm_triton(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens * hidden)
    x = rows_of_wider(tokens, hidden, g, dtype, scale=3)
    residual = rows_of_wider(tokens, hidden, g, dtype)
    weight = randn(hidden, g=g, dtype=dtype)
    x_before, residual_before = x.clone(), residual.clone()

    out, h = rms_norm(x, weight, 1e-5, residual, backend="triton")
    want_out, want_h = rms_norm(x, weight, 1e-5, residual, backend="torch")
    assert out.dtype == h.dtype == dtype and out.shape == h.shape == (tokens, hidden)
    assert torch.equal(h, want_h), "x + residual rounds exactly like PyTorch's add"
    assert_ulps(out, want_out, AFTER_MULTIPLY[dtype], "rms_norm with a residual")
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "the inputs are left as they were"

    out, h = rms_norm(x, weight, 1e-6, backend="triton")
    assert h is x
    assert_ulps(out, rms_norm(x, weight, 1e-6, backend="torch")[0], AFTER_MULTIPLY[dtype], "rms_norm")
    # a unit weight shows the normalized row itself, where fp32 is rounded to the dtype
    ones = torch.ones_like(weight)
    assert_ulps(rms_norm(x, ones, 1e-6, backend="triton")[0], rms_norm(x, ones, 1e-6, backend="torch")[0],
                AT_ROUNDING[dtype], "rms_norm, unit weight")


@dtype_ids
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 32), (3, 3, 16), (2, 1, 64)])
def test_rotary_triton_bit_equal(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                 dtype: torch.dtype) -> None:
    """q and k are views into one qkv row (v after them); rope is products and sums rounded where PyTorch
    rounds them, so the kernel is bit-equal. v and the columns around q and k are left untouched."""
    g = torch.Generator().manual_seed(tokens * 100 + head_dim)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = rows_of_wider(tokens, q_size + 2 * kv_size, g, dtype, scale=2)
    q = qkv[:, :q_size].view(tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    cos, sin = rope_cos_sin(torch.randint(0, 8000, (tokens,), generator=g), head_dim, dtype)
    base = qkv._base.clone()

    want_q, want_k = q.clone(), k.clone()
    rotary_(want_q, want_k, cos, sin, backend="torch")
    rotary_(q, k, cos, sin, backend="triton")
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, 3:3 + q_size + kv_size] = False
    assert torch.equal(qkv._base[untouched], base[untouched]), "v and the padding columns are not written"


@dtype_ids
def test_rotary_triton_head_stride(dtype: torch.dtype) -> None:
    """Heads need not lie back to back: q's heads every 2*D elements, k a separate tensor with padded rows."""
    g = torch.Generator().manual_seed(1)
    tokens, head_dim = 3, 32
    q = randn(tokens, 4, 2 * head_dim, g=g, dtype=dtype)[:, :, :head_dim]
    k = randn(tokens, 40 + 2 * head_dim, g=g, dtype=dtype)[:, 40:].view(tokens, 2, head_dim)
    cos, sin = randn(tokens, head_dim, g=g, dtype=dtype), randn(tokens, head_dim, g=g, dtype=dtype)
    want_q, want_k = q.clone(), k.clone()
    rotary_(want_q, want_k, cos, sin, backend="torch")
    rotary_(q, k, cos, sin, backend="triton")
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@dtype_ids
@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("inter", [300, 2048 + 77])  # the second spans several column blocks
def test_silu_and_mul_triton(tokens: int, inter: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens + inter)
    gate_up = rows_of_wider(tokens, 2 * inter, g, dtype, scale=4)
    out = silu_and_mul(gate_up, backend="triton")
    assert out.dtype == dtype and out.shape == (tokens, inter) and out.is_contiguous()
    assert_ulps(out, silu_and_mul(gate_up, backend="torch"), AFTER_MULTIPLY[dtype], "silu_and_mul")
    gate_up[:, inter:] = 1  # a unit up shows silu(gate) itself, where fp32 is rounded to the dtype
    assert_ulps(silu_and_mul(gate_up, backend="triton"), silu_and_mul(gate_up, backend="torch"),
                AT_ROUNDING[dtype], "silu_and_mul, unit up")


def test_auto_backend_and_empty_batch() -> None:
    """auto runs Triton on CUDA tensors, the reference elsewhere; no rows is no work."""
    g = torch.Generator().manual_seed(2)
    gate_up = randn(3, 64, g=g, dtype=torch.float16, scale=4)
    want = silu_and_mul(gate_up, backend="triton" if ON_GPU else "torch")
    assert torch.equal(silu_and_mul(gate_up), want)
    x, w = randn(0, 48, g=g, dtype=torch.float16), randn(48, g=g, dtype=torch.float16)
    for backend in ("torch", "triton"):
        out, h = rms_norm(x, w, 1e-5, x, backend=backend)
        assert out.shape == h.shape == (0, 48)
        assert silu_and_mul(randn(0, 64, g=g, dtype=torch.float16), backend=backend).shape == (0, 32)
        rotary_(x.view(0, 3, 16), x.view(0, 3, 16), x[:, :16], x[:, :16], backend=backend)


# --- bad arguments ------------------------------------------------------------------------------------------

def _bad_calls() -> list[tuple[str, object]]:
    f32 = dict(dtype=torch.float32, device=DEVICE)
    x, w = torch.zeros(4, 64, **f32), torch.zeros(64, **f32)
    q, k, cs = torch.zeros(4, 2, 16, **f32), torch.zeros(4, 1, 16, **f32), torch.zeros(4, 16, **f32)
    return [
        ("backend", lambda: rms_norm(x, w, 1e-5, backend="cuda")),
        ("x", lambda: rms_norm(x[0], w, 1e-5)),
        ("x", lambda: rms_norm(x.long(), w, 1e-5)),
        ("x", lambda: rms_norm(x[:, ::2], w[:32], 1e-5)),  # last dim not contiguous
        ("weight", lambda: rms_norm(x, w[:32], 1e-5)),
        ("weight", lambda: rms_norm(x, w.half(), 1e-5)),
        ("eps", lambda: rms_norm(x, w, -1.0)),
        ("eps", lambda: rms_norm(x, w, float("nan"))),
        ("residual", lambda: rms_norm(x, w, 1e-5, x[:2])),
        ("residual", lambda: rms_norm(x, w, 1e-5, x.half())),
        ("backend", lambda: rotary_(q, k, cs, cs, backend="loop")),
        ("q", lambda: rotary_(q[:, :, :15], k[:, :, :15], cs[:, :15], cs[:, :15])),  # odd head dim
        ("q", lambda: rotary_(q[0], k, cs, cs)),
        ("k", lambda: rotary_(q, k[:3], cs, cs)),
        ("k", lambda: rotary_(q, k.half(), cs, cs)),
        ("cos", lambda: rotary_(q, k, cs[:, None], cs)),
        ("sin", lambda: rotary_(q, k, cs, cs.half())),
        ("backend", lambda: silu_and_mul(x, backend="gather_bmm")),
        ("gate_up", lambda: silu_and_mul(x[:, :63])),
        ("gate_up", lambda: silu_and_mul(x.int())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error_naming_them(case: int) -> None:
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()
