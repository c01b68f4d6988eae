"""kernels.paged_decode_attention: the torch reference against SDPA on each sequence's gathered keys, and
the Triton kernel against the reference on fresh random inputs (CPU: Triton's interpreter, fp32 and fp16;
KERNELS_TEST_DEVICE=cuda runs the same on a GPU, with bf16 too)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels import paged_decode_attention
from kernels.paged_attention import block_n, num_splits

DEVICE = os.environ.get("KERNELS_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
DTYPES = (torch.float32, torch.float16, *((torch.bfloat16,) if ON_GPU else ()))
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_case(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              block_size: int = 16, max_blocks: int | None = None, seed: int = 0) -> dict:
    """A cache with more blocks than the sequences use, handed out in shuffled order; block table entries
    past each context hold garbage block ids (far out of range) that must never be read. q is the
    query part of a fused qkv tensor, so its head and row strides are not those of a [B, Hq, D] tensor."""
    g = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    needed = [-(-n // block_size) for n in context_lens]
    max_blocks = max_blocks or max(1, *needed)
    num_blocks = sum(needed) + 5
    ids = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(10**6, 2 * 10**6, (batch, max_blocks), generator=g)
    start = 0
    for b, n in enumerate(needed):
        tables[b, :n] = ids[start:start + n]
        start += n
    cache_shape = (num_blocks * block_size, num_kv_heads, head_dim)
    qkv = torch.randn(batch, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    case = dict(q=qkv[:, :num_heads * head_dim].view(batch, num_heads, head_dim),
                k_cache=torch.randn(cache_shape, generator=g).to(dtype),
                v_cache=torch.randn(cache_shape, generator=g).to(dtype),
                block_tables=tables.to(torch.int32), context_lens=torch.tensor(context_lens, dtype=torch.int32))
    case = {k: v.to(DEVICE) for k, v in case.items()}
    return dict(case, block_size=block_size, scale=head_dim**-0.5)


def sdpa_per_sequence(c: dict) -> torch.Tensor:
    """Independent of the reference: walk each sequence's tokens through its block table one by one,
    then run PyTorch's SDPA in float64 (GQA by repeat_interleave)."""
    q, bs = c["q"], c["block_size"]
    group = q.shape[1] // c["k_cache"].shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(c["context_lens"].tolist()):
        if n == 0:
            continue
        slots = [int(c["block_tables"][b, t // bs]) * bs + t % bs for t in range(n)]
        k = c["k_cache"][slots].cpu().double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = c["v_cache"][slots].cpu().double().repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[b].cpu().double()[:, None, :]  # [Hq, 1, D]
        out[b] = F.scaled_dot_product_attention(qb, k, v, scale=c["scale"])[:, 0]
    return out


def attend(c: dict, backend: str, **kw) -> torch.Tensor:
    return paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"],
                                  block_size=c["block_size"], scale=c["scale"], backend=backend, **kw)


# ragged lengths: empty (a CUDA-graph padding row), one key, exactly two blocks, a partial block
LENS = [0, 1, 32, 45]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_reference_matches_sdpa(heads: tuple[int, int], dtype: torch.dtype) -> None:
    c = make_case([*LENS, 70], *heads, 64, dtype, seed=heads[0])
    got = attend(c, "torch")
    assert got.dtype == dtype and got.shape == c["q"].shape
    torch.testing.assert_close(got.cpu().double(), sdpa_per_sequence(c), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_triton_matches_reference(heads: tuple[int, int], head_dim: int, dtype: torch.dtype) -> None:
    c = make_case(LENS, *heads, head_dim, dtype, seed=head_dim + heads[1])
    want = attend(c, "torch")
    got = attend(c, "triton")
    assert got.dtype == dtype and not got.isnan().any()
    assert torch.equal(got[0], torch.zeros_like(got[0])), "a row with no keys gets zeros"
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_long_context_is_split_and_combined(dtype: torch.dtype) -> None:
    """One sequence and one kv head: too few programs, so the keys are cut into several splits, some of
    them empty for the short and empty sequences; the combine kernel merges the partial softmaxes."""
    lens = [5 * block_n(64) + 7, 0, 3]
    c = make_case(lens, 4, 1, 64, dtype, block_size=8, seed=7)
    splits = num_splits(3, 1, c["block_tables"].shape[1], 8, 64, c["q"].device)
    assert splits > 1 or ON_GPU
    got = attend(c, "triton")
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got.float(), attend(c, "torch").float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_splits_depend_on_shapes_only() -> None:
    cuda_like = torch.device("cpu")
    assert num_splits(64, 8, 256, 16, 128, cuda_like) == 1  # enough (sequence, kv head) programs
    one = num_splits(1, 1, 256, 16, 128, cuda_like)
    assert one > 1 and one & (one - 1) == 0  # a power of two (the combine kernel's arange)
    assert num_splits(1, 1, 1, 16, 128, cuda_like) == 1  # a context of one tile cannot be split


def test_writes_into_out_and_leaves_the_rest_alone() -> None:
    c = make_case([20, 9], 4, 2, 32, torch.float32, seed=3)
    big = torch.full((2, 6, 32), 7.0, device=DEVICE)
    view = big[:, 1:5]  # strided [B, Hq, D]
    result = attend(c, "triton", out=view)
    assert result.data_ptr() == view.data_ptr()
    torch.testing.assert_close(view, attend(c, "torch"), rtol=1e-4, atol=1e-4)
    assert (big[:, 0] == 7).all() and (big[:, 5] == 7).all()


def test_auto_picks_triton_on_cuda_and_reference_elsewhere() -> None:
    c = make_case([10, 33], 4, 2, 32, torch.float32, seed=4)
    want = attend(c, "triton" if ON_GPU else "torch")
    torch.testing.assert_close(attend(c, "auto"), want, rtol=0, atol=0)


def test_empty_batch() -> None:
    c = make_case([3], 4, 2, 32, torch.float32)
    c.update(q=c["q"][:0], block_tables=c["block_tables"][:0], context_lens=c["context_lens"][:0])
    for backend in ("torch", "triton"):
        assert attend(c, backend).shape == (0, 4, 32)


# --- bad arguments ----------------------------------------------------------------------------------------

def _good() -> dict:
    """On the CPU wherever the tests run: the checks look at shapes, dtypes and devices only."""
    c = make_case([5, 9], 4, 2, 32, torch.float32)
    return {k: v.cpu().contiguous() if isinstance(v, torch.Tensor) else v for k, v in c.items()}


@pytest.mark.parametrize("change, argument", [
    (dict(backend="flash"), "backend"),
    (dict(q=torch.randn(2, 4, 32, dtype=torch.float64)), "q"),
    (dict(q=torch.randn(2, 4)), "q"),
    (dict(q=torch.randn(2, 4, 8), backend="triton"), "q"),
    (dict(q=torch.randn(2, 4, 64)[..., ::2]), "q"),
    (dict(q=torch.randn(2, 5, 32)), "k_cache"),
    (dict(k_cache=torch.randn(64, 2, 16)), "k_cache"),
    (dict(k_cache=torch.randn(64, 2, 32, dtype=torch.float16)), "k_cache"),
    (dict(k_cache=torch.randn(64, 32, 2).transpose(1, 2)), "k_cache"),
    (dict(v_cache=torch.randn(48, 2, 32)), "v_cache"),
    (dict(block_tables=torch.zeros(2, 3, dtype=torch.int64)), "block_tables"),
    (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), "block_tables"),
    (dict(context_lens=torch.tensor([5, 9])), "context_lens"),
    (dict(context_lens=torch.tensor([5], dtype=torch.int32)), "context_lens"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=16.0), "block_size"),
    (dict(scale=-1.0), "scale"),
    (dict(out=torch.empty(2, 4, 32, dtype=torch.float16)), "out"),
    (dict(out=torch.empty(2, 4, 31)), "out"),
    (dict(k_cache=torch.randn(64, 2, 32, device="meta")), "k_cache"),
])
def test_bad_argument_names_the_argument(change: dict, argument: str) -> None:
    c = _good()
    c.update(change)
    backend = c.pop("backend", "torch")
    with pytest.raises(ValueError, match=f"^{argument}"):
        paged_decode_attention(c.pop("q"), c.pop("k_cache"), c.pop("v_cache"), c.pop("block_tables"),
                               c.pop("context_lens"), backend=backend, **c)
