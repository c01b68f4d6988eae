"""kernels/: every backend against the one PyTorch reference, on fresh random inputs (CPU: Triton runs
in its interpreter, in fp32 and fp16; bf16 is checked on the GPU by benchmarks/kernels.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels
from kernels import LoRAMeta, add_lora, add_lora_slices, triton_linear

# KERNELS_TEST_DEVICE=cuda runs the backend tests on a GPU, with the cuda backend and bf16 too.
DEVICE = os.environ.get("KERNELS_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
CPU_BACKENDS = ("loop", "gather_bmm", "triton_sgmv", "triton_bgmv", "triton_sgmv_pdl", *(("cuda",) if ON_GPU else ()))
DTYPES = (torch.float32, torch.float16, *((torch.bfloat16,) if ON_GPU else ()))
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make_case(t: int, d_in: int, outs: tuple[int, ...], num_slots: int, max_rank: int, dtype: torch.dtype,
              slot_ids: list[int] | None = None, ranks: list[int] | None = None, seed: int = 0,
              device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=g).to(dtype)
    y = torch.randn(t, sum(outs), generator=g).to(dtype)
    ranks_t = torch.tensor(ranks if ranks is not None else [max_rank] * num_slots, dtype=torch.int32)
    pad = (torch.arange(max_rank)[None, :] < ranks_t[:, None]).to(dtype)  # [slots, max_rank]
    lora_a = [(torch.randn(num_slots, max_rank, d_in, generator=g) / d_in**0.5).to(dtype) * pad[:, :, None]
              for _ in outs]
    lora_b = [(torch.randn(num_slots, o, max_rank, generator=g) / max_rank**0.5).to(dtype) * pad[:, None, :]
              for o in outs]
    if slot_ids is None:
        slot_ids = torch.randint(-1, num_slots, (t,), generator=g).tolist()
    scalings = (torch.rand(num_slots, generator=g) + 0.5).float()
    case = dict(y=y, x=x, lora_a=lora_a, lora_b=lora_b, slot_ids=torch.tensor(slot_ids, dtype=torch.int32),
                scalings=scalings, ranks=ranks_t if ranks is not None else None)
    return {k: _to(v, device) for k, v in case.items()}


def _to(v: object, device: str) -> object:
    if isinstance(v, list):
        return [t.to(device) for t in v]
    return v.to(device) if isinstance(v, torch.Tensor) else v


def independent_f64(c: dict) -> torch.Tensor:
    """Row by row in float64, straight from the contract's formula."""
    y = c["y"].double().clone()
    col = 0
    for a, b in zip(c["lora_a"], c["lora_b"], strict=True):
        for i, s in enumerate(c["slot_ids"].tolist()):
            if s >= 0:
                y[i, col:col + b.shape[1]] += c["scalings"][s].double() * (
                    (c["x"][i].double() @ a[s].double().T) @ b[s].double().T)
        col += b.shape[1]
    return y


def run(c: dict, backend: str, meta: LoRAMeta | None = None) -> torch.Tensor:
    y = c["y"].clone()
    add_lora_slices(y, c["x"], c["lora_a"], c["lora_b"], c["slot_ids"], c["scalings"], ranks=c["ranks"],
                    meta=meta, backend=backend)
    return y


def assert_matches_reference(c: dict, backend: str) -> None:
    want = run(c, "torch")
    got = run(c, backend)
    dtype = c["y"].dtype
    no_adapter = c["slot_ids"] < 0
    assert torch.equal(got[no_adapter], c["y"][no_adapter]), "rows with slot -1 must stay untouched"
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


# --- the reference itself, against an independent float64 computation ---------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_matches_float64_formula(dtype: torch.dtype) -> None:
    c = make_case(23, 40, (24, 8), num_slots=5, max_rank=8, dtype=dtype, ranks=[8, 4, 1, 8, 3])
    got = run(c, "torch")
    torch.testing.assert_close(got.double(), independent_f64(c), rtol=TOL[dtype], atol=TOL[dtype])


def test_add_lora_is_the_one_slice_form() -> None:
    c = make_case(9, 32, (16,), num_slots=3, max_rank=4, dtype=torch.float32)
    y = c["y"].clone()
    add_lora(y, c["x"], c["lora_a"][0], c["lora_b"][0], c["slot_ids"], c["scalings"], backend="torch")
    torch.testing.assert_close(y.double(), independent_f64(c), rtol=1e-5, atol=1e-5)


def test_auto_uses_reference_on_cpu() -> None:
    c = make_case(7, 16, (16,), num_slots=2, max_rank=4, dtype=torch.float32)
    torch.testing.assert_close(run(c, "auto"), run(c, "torch"), rtol=0, atol=0)


# --- LoRAMeta ------------------------------------------------------------------------------------------

def test_meta_groups_rows_by_slot() -> None:
    slot_ids = torch.tensor([2, -1, 0, 2, 2, -1, 0], dtype=torch.int32)
    meta = LoRAMeta.build(slot_ids, 4)
    assert meta.sorted_rows.tolist() == [1, 5, 2, 6, 0, 3, 4]
    assert meta.counts.tolist() == [2, 0, 3, 0]
    assert meta.seg_starts.tolist() == [2, 4, 4, 7]
    blocks = meta.blocks(2)
    used = [tuple(b) for b in blocks.tolist() if b[0] >= 0]
    assert used == [(0, 2, 4), (2, 4, 6), (2, 6, 7)]
    assert blocks.shape[0] >= len(used)
    assert all(b == [-1, 0, 0] for b in blocks.tolist() if b[0] < 0)


def test_meta_is_reused_across_layers() -> None:
    c = make_case(30, 24, (16,), num_slots=4, max_rank=8, dtype=torch.float32, device=DEVICE)
    meta = LoRAMeta.build(c["slot_ids"], 4)
    for backend in ("triton_sgmv", "triton_bgmv", "loop"):
        torch.testing.assert_close(run(c, backend, meta), run(c, "torch"), rtol=1e-4, atol=1e-4)


def test_meta_grid_sized_by_max_adapters() -> None:
    """Two adapters in use out of 16 slots: a grid for 2 adapters holds every row's block, and the
    segment backends give the reference's result with it; more distinct slots than declared fail."""
    slots = [3, 11, -1, 3, 11, 11, 3, -1, 11, 3, 3, 11, 3]
    c = make_case(len(slots), 24, (16, 8), num_slots=16, max_rank=8, dtype=torch.float32, slot_ids=slots,
                  device=DEVICE)
    meta = LoRAMeta.build(c["slot_ids"], 16, max_adapters=2)
    assert meta.blocks(4).shape[0] == -(-len(slots) // 4) + 2 < LoRAMeta.build(c["slot_ids"], 16).blocks(4).shape[0]
    for backend in ("triton_sgmv", "triton_sgmv_pdl", *(("cuda",) if ON_GPU else ())):
        torch.testing.assert_close(run(c, backend, meta), run(c, "torch"), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="max_adapters"):
        LoRAMeta.build(c["slot_ids"], 16, max_adapters=1)


# --- every backend against the reference ----------------------------------------------------------------

CASES = {
    # name: (t, in, outs, num_slots, max_rank, slot_ids, ranks)
    "unsorted_with_no_adapter_rows": (37, 48, (40,), 5, 16, None, None),
    "all_rows_no_adapter": (11, 32, (24,), 3, 8, [-1] * 11, None),
    "one_slot_for_all_rows": (29, 40, (36,), 4, 16, [2] * 29, None),
    "every_row_its_own_slot": (13, 24, (20,), 13, 8, [12 - i for i in range(13)], None),
    "mixed_ranks": (33, 56, (48,), 4, 16, None, [16, 3, 0, 9]),
    "odd_sizes": (19, 37, (53,), 3, 5, None, None),
    "single_row": (1, 64, (32,), 3, 16, [1], None),
    "multi_slice_qkv": (21, 48, (48, 16, 16), 3, 8, None, None),
    "multi_slice_mixed_ranks": (17, 32, (24, 40), 4, 16, None, [16, 5, 1, 12]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_reference(backend: str, case: str, dtype: torch.dtype) -> None:
    t, d_in, outs, slots, rank, slot_ids, ranks = CASES[case]
    c = make_case(t, d_in, outs, slots, rank, dtype, slot_ids, ranks, seed=len(case) * t, device=DEVICE)
    assert_matches_reference(c, backend)


@pytest.mark.parametrize("backend", ["triton_sgmv", "triton_bgmv"])
@pytest.mark.parametrize("case", list(CASES))
def test_reduction_split_among_programs(case: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With many programs wanted (as on a GPU), the reduction over `in` is cut in parts that expand sums."""
    from kernels import launch

    monkeypatch.setattr(launch, "num_programs_target", lambda device, per_sm=4: 512)
    t, d_in, outs, slots, rank, slot_ids, ranks = CASES[case]
    c = make_case(t, d_in + 200, outs, slots, rank, torch.float32, slot_ids, ranks, seed=t, device=DEVICE)
    assert launch.split_k(d_in + 200, 32, 2, torch.device(DEVICE))[0] > 1
    assert_matches_reference(c, backend)


@pytest.mark.parametrize("backend", (*CPU_BACKENDS, "torch", "auto"))
def test_empty_batch_is_a_no_op(backend: str) -> None:
    c = make_case(0, 16, (16,), num_slots=2, max_rank=4, dtype=torch.float32)
    y = run(c, backend)
    assert y.shape == (0, 16)


PREFILL_BACKENDS = ("triton_bgmv", *(("cuda",) if ON_GPU else ()))  # their kernels change at prefill sizes


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", PREFILL_BACKENDS)
def test_prefill_kernels_on_every_case(backend: str, case: str, dtype: torch.dtype,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels for prefill-sized batches (tiles of consecutive rows through tensor cores), driven on
    every case by lowering the size where they take over; triton_bgmv with tiles of 8 rows. The reduction
    is split among programs as on a GPU."""
    from kernels import launch, triton_bgmv

    monkeypatch.setattr(launch, "PREFILL_ROWS_ABOVE", 0)
    monkeypatch.setattr(launch, "PREFILL_ROWS_PER_ADAPTER", 0)
    monkeypatch.setattr(triton_bgmv, "TILE_M", 8)
    monkeypatch.setattr(launch, "num_programs_target", lambda device, per_sm=4: 512)
    t, d_in, outs, slots, rank, slot_ids, ranks = CASES[case]
    c = make_case(t, d_in + 200, outs, slots, rank, dtype, slot_ids, ranks, seed=t, device=DEVICE)
    assert_matches_reference(c, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("max_rank", [16, 64])
@pytest.mark.parametrize("backend", PREFILL_BACKENDS)
def test_prefill_batch_of_request_runs(backend: str, max_rank: int, dtype: torch.dtype) -> None:
    """A prefill-sized batch: requests' tokens in runs of one slot, runs that straddle tiles, rows without
    adapter, one stretch where every row has its own slot, and mixed ranks."""
    from kernels import launch

    runs = [(2, 70), (-1, 20), (0, 100), (3, 5)] + [(s % 4, 1) for s in range(30)] + [(1, 90)]
    slot_ids = [s for s, n in runs for _ in range(n)]
    assert launch.prefill_tiles(len(slot_ids), 4)
    c = make_case(len(slot_ids), 40, (24, 136), num_slots=4, max_rank=max_rank, dtype=dtype, slot_ids=slot_ids,
                  ranks=[max_rank, 4, max_rank - 7, 1], seed=5, device=DEVICE)
    assert_matches_reference(c, backend)


def test_large_segment_spans_many_blocks() -> None:
    c = make_case(150, 32, (24,), num_slots=2, max_rank=16, dtype=torch.float32,
                  slot_ids=[1] * 140 + [0] * 5 + [-1] * 5, device=DEVICE)
    assert_matches_reference(c, "triton_sgmv")


@pytest.mark.parametrize("backend", ["triton_sgmv", "triton_bgmv", "triton_sgmv_pdl"])
def test_weight_stacks_of_any_layout(backend: str) -> None:
    """Views whose last stride is not 1 take the kernels' general path (no vector loads): same result."""
    from kernels import launch

    c = make_case(12, 32, (24, 8), num_slots=3, max_rank=8, dtype=torch.float32, device=DEVICE)
    c["lora_a"] = [a.transpose(1, 2).contiguous().transpose(1, 2) for a in c["lora_a"]]
    c["lora_b"] = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in c["lora_b"]]
    assert not launch.vector_aligned(*c["lora_a"]) and not launch.vector_aligned(*c["lora_b"])
    assert_matches_reference(c, backend)


def test_vector_aligned_needs_unit_stride_aligned_base_and_whole_vector_strides() -> None:
    from kernels import launch

    stack = torch.zeros(4, 16, 64, dtype=torch.float16)  # 8 halves to a 16-byte vector
    assert launch.vector_aligned(stack, stack[1:], stack[:, :, :8])
    assert not launch.vector_aligned(stack[:, :, 1:])  # base 2 bytes past a vector boundary
    assert not launch.vector_aligned(torch.zeros(4, 16, 60, dtype=torch.float16))  # rows of 7.5 vectors
    assert not launch.vector_aligned(stack.transpose(1, 2))


def test_writes_only_its_columns_of_a_strided_output() -> None:
    c = make_case(10, 32, (16,), num_slots=2, max_rank=4, dtype=torch.float32, device=DEVICE)
    big = torch.randn(10, 40).to(DEVICE)
    view = big[:, 8:24]
    view.copy_(c["y"])
    before = big.clone()
    for backend in ("triton_sgmv", "triton_bgmv"):
        add_lora(view, c["x"], c["lora_a"][0], c["lora_b"][0], c["slot_ids"], c["scalings"], backend=backend)
        assert torch.equal(big[:, :8], before[:, :8]) and torch.equal(big[:, 24:], before[:, 24:])
        view.copy_(before[:, 8:24])
    want = run(c, "torch")
    add_lora(view, c["x"], c["lora_a"][0], c["lora_b"][0], c["slot_ids"], c["scalings"], backend="triton_sgmv")
    torch.testing.assert_close(view, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", (*CPU_BACKENDS, "torch", "auto"))
@pytest.mark.parametrize("case", ["unsorted_with_no_adapter_rows", "multi_slice_mixed_ranks", "all_rows_no_adapter"])
def test_linear_lora_is_the_base_projection_plus_the_delta(backend: str, case: str) -> None:
    """The two-launch backends run their shrink before the base GEMM (on a side stream on a GPU): the same
    result as the GEMM followed by add_lora_slices."""
    t, d_in, outs, slots, rank, slot_ids, ranks = CASES[case]
    c = make_case(t, d_in, outs, slots, rank, torch.float32, slot_ids, ranks, seed=t + 7, device=DEVICE)
    weight = torch.randn(sum(outs), d_in, generator=torch.Generator().manual_seed(t)).to(DEVICE)
    c["y"] = c["x"] @ weight.T
    got = kernels.linear_lora(c["x"], weight, c["lora_a"], c["lora_b"], c["slot_ids"], c["scalings"],
                              ranks=c["ranks"], backend=backend)
    torch.testing.assert_close(got, run(c, "torch"), rtol=1e-4, atol=1e-4)


def test_linear_lora_checks_the_weight_and_handles_empty_batches() -> None:
    c = make_case(5, 16, (8, 4), num_slots=2, max_rank=4, dtype=torch.float32)
    args = (c["lora_a"], c["lora_b"], c["slot_ids"], c["scalings"])
    for weight in (torch.randn(12, 15), torch.randn(12, 16, dtype=torch.float16), torch.randn(12)):
        with pytest.raises(ValueError, match=r"^weight"):
            kernels.linear_lora(c["x"], weight, *args)
    with pytest.raises(ValueError, match=r"^weight: expected 12 rows"):
        kernels.linear_lora(c["x"], torch.randn(11, 16), *args)
    empty = make_case(0, 16, (8, 4), num_slots=2, max_rank=4, dtype=torch.float32)
    out = kernels.linear_lora(empty["x"], torch.randn(12, 16), empty["lora_a"], empty["lora_b"],
                              empty["slot_ids"], empty["scalings"], backend="triton_sgmv")
    assert out.shape == (0, 12)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("gemm_backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("backend", ["triton_sgmv", "triton_sgmv_pdl", "torch"])
def test_linear_lora_base_gemm_is_kernels_linear(backend: str, gemm_backend: str, dtype: torch.dtype) -> None:
    """linear_lora's base GEMM is kernels.linear's with the same backend (on a GPU, "auto" is the Triton
    decode GEMM), so a LoRA step and a base-only step compute the base projection alike, to the bit. On a
    Hopper GPU the expand then runs as the GEMM's programmatic dependent: it must not read y early."""
    c = make_case(24, 160, (64, 32), num_slots=3, max_rank=16, dtype=dtype, seed=5, device=DEVICE)
    weight = (torch.randn(96, 160, generator=torch.Generator().manual_seed(1)) / 160**0.5).to(dtype).to(DEVICE)
    c["y"] = kernels.linear(c["x"], weight, backend=gemm_backend)
    got = kernels.linear_lora(c["x"], weight, c["lora_a"], c["lora_b"], c["slot_ids"], c["scalings"],
                              backend=backend, gemm_backend=gemm_backend)
    assert torch.equal(got, run(c, backend))


# --- kernels.linear: the Triton decode GEMM against torch's -------------------------------------------------

@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("m, k, n", [(1, 256, 96), (5, 200, 130), (16, 128, 64), (64, 384, 520)])
def test_triton_linear_matches_torch(m: int, k: int, n: int, dtype: torch.dtype) -> None:
    """Rows, `in` and `out` off the tile sizes included (masked edges): fp32 accumulation, one rounding."""
    g = torch.Generator().manual_seed(m * k + n)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    assert triton_linear.supports(x, weight)
    got = kernels.linear(x, weight, backend="triton")
    want = x.double() @ weight.double().T
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype] / 4, atol=TOL[dtype] / 4)
    torch.testing.assert_close(kernels.linear(x, weight, backend="torch").double(), want,
                               rtol=TOL[dtype] / 4, atol=TOL[dtype] / 4)


def test_linear_takes_torch_where_the_triton_gemm_does_not_apply() -> None:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 32, generator=g).half()
    cases = {"more rows than one tile": torch.randn(triton_linear.MAX_ROWS + 1, 32, generator=g).half(),
             "fp32": torch.randn(4, 32, generator=g), "strided rows": torch.randn(4, 64, generator=g).half()[:, ::2]}
    for name, x in cases.items():
        w = weight.float() if x.dtype == torch.float32 else weight
        assert not triton_linear.supports(x, w), name
        assert torch.equal(kernels.linear(x, w, backend="triton"), torch.mm(x, w.t())), name
    # "auto" is torch's on the CPU
    x = torch.randn(4, 32, generator=g).half()
    assert torch.equal(kernels.linear(x, weight), torch.mm(x, weight.t()))


def test_linear_checks_its_arguments() -> None:
    x, weight = torch.randn(4, 32), torch.randn(8, 32)
    for bad_weight in (torch.randn(8, 31), torch.randn(8, 32).half(), torch.randn(32)):
        with pytest.raises(ValueError, match=r"^weight"):
            kernels.linear(x, bad_weight)
    with pytest.raises(ValueError, match=r"^x"):
        kernels.linear(torch.randn(32), weight)
    with pytest.raises(ValueError, match=r"^backend"):
        kernels.linear(x, weight, backend="cublas")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_cuda_backend_explains_why_it_cannot_run() -> None:
    c = make_case(4, 16, (16,), num_slots=2, max_rank=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="cuda backend"):
        run(c, "cuda")


# --- bad arguments ---------------------------------------------------------------------------------------

def _bad(**change):
    c = make_case(6, 16, (8,), num_slots=3, max_rank=4, dtype=torch.float32)
    c["lora_a"], c["lora_b"] = c["lora_a"][0], c["lora_b"][0]
    c.update(change)
    y, backend = c.pop("y"), c.pop("backend", "torch")
    return lambda: add_lora(y, **c, backend=backend)


@pytest.mark.parametrize("change, argument", [
    (dict(x=torch.randn(6, 15)), "lora_a"),
    (dict(x=torch.randn(5, 16)), "y"),
    (dict(x=torch.randn(6, 16, dtype=torch.float64)), "x"),
    (dict(y=torch.randn(6, 9)), "y"),
    (dict(y=torch.randn(6, 8, dtype=torch.float16)), "y"),
    (dict(lora_a=torch.randn(3, 5, 16)), "lora_b"),
    (dict(lora_b=torch.randn(2, 8, 4)), "lora_b"),
    (dict(lora_a=torch.randn(3, 4, 16, dtype=torch.float16)), "lora_a"),
    (dict(slot_ids=torch.tensor([0, 1, 2, 3, 0, 0], dtype=torch.int32)), "slot_ids"),
    (dict(slot_ids=torch.tensor([0, 1, -2, 0, 0, 0], dtype=torch.int32)), "slot_ids"),
    (dict(slot_ids=torch.zeros(6, dtype=torch.int64)), "slot_ids"),
    (dict(slot_ids=torch.zeros(5, dtype=torch.int32)), "slot_ids"),
    (dict(scalings=torch.ones(3, dtype=torch.float64)), "scalings"),
    (dict(scalings=torch.ones(2)), "scalings"),
    (dict(ranks=torch.tensor([4, 5, 1], dtype=torch.int32)), "ranks"),
    (dict(ranks=torch.tensor([4, 4, 1], dtype=torch.int64)), "ranks"),
    (dict(meta=LoRAMeta.build(torch.zeros(6, dtype=torch.int32), 2)), "meta"),
    (dict(backend="fastest"), "backend"),
    (dict(lora_a=torch.randn(3, 4, 16, device="meta")), "lora_a"),
])
def test_bad_argument_names_the_argument(change: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"^{argument}"):
        _bad(**change)()


def test_bad_slice_lists_are_rejected() -> None:
    c = make_case(4, 16, (8, 8), num_slots=2, max_rank=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="lora_a, lora_b"):
        add_lora_slices(c["y"], c["x"], c["lora_a"], c["lora_b"][:1], c["slot_ids"], c["scalings"])
    with pytest.raises(ValueError, match=r"lora_b\[1\]"):
        add_lora_slices(c["y"], c["x"], c["lora_a"], [c["lora_b"][0], c["lora_b"][1][:, :, :3]],
                        c["slot_ids"], c["scalings"])


def test_package_exports_the_contract() -> None:
    assert {"add_lora", "add_lora_slices", "linear", "linear_lora", "LoRAMeta"} <= set(kernels.__all__)
    assert set(kernels.BACKENDS) == {"torch", "loop", "gather_bmm", "triton_sgmv", "triton_bgmv",
                                     "triton_sgmv_pdl", "cuda", "auto"}

