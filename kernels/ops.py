"""The public entry points: argument checks, batch metadata, backend dispatch."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch

from kernels import launch, triton_linear
from kernels.checks import FLOAT_DTYPES, check_op_backend, describe, use_triton
from kernels.meta import LoRAMeta
from kernels.reference import add_lora_gather_bmm, add_lora_loop, add_lora_torch

BACKENDS = ("torch", "loop", "gather_bmm", "triton_sgmv", "triton_bgmv", "triton_sgmv_pdl", "cuda", "auto")


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             slot_ids: torch.Tensor, scalings: torch.Tensor, *, ranks: torch.Tensor | None = None,
             meta: LoRAMeta | None = None, backend: str = "auto") -> None:
    """y[i] += scalings[s] * (x[i] @ lora_a[s].T) @ lora_b[s].T for s = slot_ids[i] >= 0, in place."""
    add_lora_slices(y, x, (lora_a,), (lora_b,), slot_ids, scalings, ranks=ranks, meta=meta, backend=backend)


def add_lora_slices(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                    lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor, *,
                    ranks: torch.Tensor | None = None, meta: LoRAMeta | None = None,
                    backend: str = "auto") -> None:
    """Merged projections: slice j adds (x @ lora_a[j][s].T) @ lora_b[j][s].T into its own columns of y.

    Without meta, slot ids (and ranks) are range-checked here, which syncs with the device; a caller
    on the hot path builds LoRAMeta once per step (that checks the slot ids) and passes it to every layer.
    """
    lora_a, lora_b = tuple(lora_a), tuple(lora_b)
    offsets = _check(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, backend)
    meta = meta if meta is not None else _build_meta(slot_ids, lora_a, ranks)
    if y.shape[0] == 0 or meta.num_slots == 0:
        return
    fn = _backend_fn(_backend_name(backend, x, lora_a, lora_b, meta.max_adapters))
    fn(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets)


def linear(x: torch.Tensor, weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x @ weight.T as a new tensor. "auto": on a GPU at decode sizes our Triton GEMM (kernels.triton_linear),
    else torch's; "torch": torch's; "triton": the Triton GEMM wherever it takes the shape (on the CPU through
    the interpreter)."""
    check_op_backend(backend)
    _check_linear(x, weight)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    return _gemm(y, x, weight, _triton_gemm(x, weight, backend))


def _triton_gemm(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    return use_triton(backend, x) and triton_linear.supports(x, weight)


def _gemm(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, triton_gemm: bool) -> torch.Tensor:
    if triton_gemm:
        triton_linear.linear(x, weight, out=y)
    else:
        torch.mm(x, weight.t(), out=y)
    return y


def linear_lora(x: torch.Tensor, weight: torch.Tensor, lora_a: Sequence[torch.Tensor],
                lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor, *,
                ranks: torch.Tensor | None = None, meta: LoRAMeta | None = None,
                backend: str = "auto", gemm_backend: str = "auto") -> torch.Tensor:
    """x @ weight.T plus add_lora_slices' delta (weight: [sum of lora_b's out sizes, in]), as a new tensor.
    The GEMM is kernels.linear's with gemm_backend, so a base-only step computes it alike.

    With a backend that works in two launches (shrink x @ A, then expand into y) the shrink needs only x,
    so on a GPU it runs on a side stream while the base GEMM runs and the expand waits for both: inside a
    decode CUDA graph that takes the shrink off the step's critical path.
    """
    check_op_backend(gemm_backend)
    _check_linear(x, weight)
    lora_a, lora_b = tuple(lora_a), tuple(lora_b)
    if all(isinstance(b, torch.Tensor) and b.dim() == 3 for b in lora_b) \
            and weight.shape[0] != (out := sum(b.shape[1] for b in lora_b)):
        raise ValueError(f"weight: expected {out} rows (the sum of lora_b's out sizes), got {weight.shape[0]}")
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    offsets = _check(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, backend)
    meta = meta if meta is not None else _build_meta(slot_ids, lora_a, ranks)
    triton_gemm = _triton_gemm(x, weight, gemm_backend)
    if y.shape[0] == 0 or meta.num_slots == 0:
        return _gemm(y, x, weight, triton_gemm)
    name = _backend_name(backend, x, lora_a, lora_b, meta.max_adapters)
    phases = _two_phase(name, x, lora_a, lora_b, meta, offsets, triton_gemm)
    if phases is None:
        _gemm(y, x, weight, triton_gemm)
        _backend_fn(name)(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets)
        return y
    # The shrink is queued before the GEMM: cuBLAS's decode GEMMs hold nearly every SM for their whole run
    # (one CTA per SM), so a shrink queued after one ran on the few SMs left and the expand waited for it
    # (H100, Llama-3-8B decode graph at batch 64 over 8 adapters: the q/k/v shrink took 26 us beside a
    # 22 us GEMM). Queued first, the graph's step went 8.16 -> 8.05 ms over 8 adapters, 9.87 -> 9.78 ms
    # over 64 (base-only 7.08 ms).
    fork = _Fork(x.device)
    shrink, expand = phases
    with fork.side():
        buf = shrink(x, lora_a, lora_b, slot_ids, ranks, meta, offsets)
    _gemm(y, x, weight, triton_gemm)
    fork.join(buf)
    expand(y, buf, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets)
    return y


def _backend_name(backend: str, x: torch.Tensor, lora_a: tuple, lora_b: tuple, adapters: int) -> str:
    if backend != "auto":
        return backend
    from kernels.auto import choose_backend

    return choose_backend(x, lora_a, lora_b, adapters)


def _backend_fn(name: str) -> Callable:
    if name == "torch":
        return add_lora_torch
    if name == "loop":
        return add_lora_loop
    if name == "gather_bmm":
        return add_lora_gather_bmm
    if name == "triton_sgmv":
        from kernels.triton_sgmv import add_lora_sgmv

        return add_lora_sgmv
    if name == "triton_bgmv":
        from kernels.triton_bgmv import add_lora_bgmv

        return add_lora_bgmv
    if name == "triton_sgmv_pdl":
        from kernels.triton_sgmv import add_lora_sgmv_pdl

        return add_lora_sgmv_pdl
    from kernels.cuda import add_lora_cuda  # "cuda"; the name was checked up front

    return add_lora_cuda


def _two_phase(name: str, x: torch.Tensor, lora_a: tuple, lora_b: tuple, meta: LoRAMeta,
               offsets: Sequence[int], after_triton_gemm: bool) -> tuple[Callable, Callable] | None:
    """(shrink, expand) of a two-launch backend, sharing one tile plan (built once per call, as in
    add_lora_sgmv). triton_sgmv_pdl's overlap of its two launches does not apply here: the expand's other
    input comes from the GEMM on the main stream. After our Triton GEMM, which triggers its dependents as
    it starts, triton_sgmv's expand is launched as its programmatic dependent instead."""
    if name in ("triton_sgmv", "triton_sgmv_pdl"):
        from kernels import triton_sgmv

        plan = triton_sgmv.Plan(x, lora_a, lora_b, meta, offsets, beside_gemm=True)
        plan.after_gemm = after_triton_gemm and launch.supports_pdl(x.device)
        return functools.partial(triton_sgmv.shrink, plan=plan), functools.partial(triton_sgmv.expand, plan=plan)
    if name == "triton_bgmv":
        from kernels import triton_bgmv

        return triton_bgmv.shrink, triton_bgmv.expand
    if name == "cuda":
        from kernels import cuda

        return cuda.shrink, cuda.expand
    return None


class _Fork:
    """A second stream that starts where the current one is now: work queued in side() may run beside what
    the current stream is given next; join(t) makes the current stream wait for it and keeps t's memory
    from reuse until then. Off CUDA there is one stream and both are no-ops."""

    def __init__(self, device: torch.device) -> None:
        self.main = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if self.main is not None:
            if device not in _side_streams:
                _side_streams[device] = torch.cuda.Stream(device)
            self.stream = _side_streams[device]
            self.stream.wait_stream(self.main)

    def side(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.main is None else torch.cuda.stream(self.stream)

    def join(self, t: torch.Tensor) -> None:
        if self.main is not None:
            self.main.wait_stream(self.stream)
            t.record_stream(self.main)


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _build_meta(slot_ids: torch.Tensor, lora_a: tuple, ranks: torch.Tensor | None) -> LoRAMeta:
    meta = LoRAMeta.build(slot_ids, lora_a[0].shape[0])  # checks the slot ids' range
    if ranks is not None:
        _check_rank_values(ranks, lora_a[0].shape[1])
    return meta


def _check_linear(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_matrix("x", x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1] \
            or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight: expected a 2-D {x.dtype} tensor [out, {x.shape[1]}] on {x.device}, "
                         f"got {describe(weight)}")


def _check_matrix(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a 2-D float16/bfloat16/float32 tensor, got {describe(t)}")


def _check(y, x, lora_a, lora_b, slot_ids, scalings, ranks, meta, backend) -> list[int]:
    """Structural checks (no device sync); returns the column offset of every slice."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for name, t in (("y", y), ("x", x)):
        _check_matrix(name, t)
    device, dtype, (t, d_in) = x.device, x.dtype, x.shape
    if y.shape[0] != t:
        raise ValueError(f"y: expected {t} rows like x, got shape {tuple(y.shape)}")
    if y.device != device or y.dtype != dtype:
        raise ValueError(f"y: expected {dtype} on {device} like x, got {describe(y)}")
    if not lora_a or len(lora_a) != len(lora_b):
        raise ValueError(f"lora_a, lora_b: expected the same number (>= 1) of slices, got {len(lora_a)} "
                         f"and {len(lora_b)}")
    num_slots, max_rank = None, None
    offsets, out = [], 0
    for j, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
        sfx = f"[{j}]" if len(lora_a) > 1 else ""
        for name, w in ((f"lora_a{sfx}", a), (f"lora_b{sfx}", b)):
            if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.dtype != dtype or w.device != device:
                raise ValueError(f"{name}: expected a 3-D {dtype} tensor on {device}, got {describe(w)}")
        if num_slots is None:
            num_slots, max_rank = a.shape[0], a.shape[1]
        if a.shape != (num_slots, max_rank, d_in):
            raise ValueError(f"lora_a{sfx}: expected shape {(num_slots, max_rank, d_in)} "
                             f"[num_slots, max_rank, in], got {tuple(a.shape)}")
        if b.shape[0] != num_slots or b.shape[2] != max_rank:
            raise ValueError(f"lora_b{sfx}: expected shape ({num_slots}, out, {max_rank}) "
                             f"[num_slots, out, max_rank], got {tuple(b.shape)}")
        offsets.append(out)
        out += b.shape[1]
    if y.shape[1] != out:
        raise ValueError(f"y: expected {out} columns (the sum of lora_b's out sizes), got {y.shape[1]}")
    if not isinstance(slot_ids, torch.Tensor) or slot_ids.shape != (t,) or slot_ids.dtype != torch.int32 \
            or slot_ids.device != device:
        raise ValueError(f"slot_ids: expected an int32 tensor of shape ({t},) on {device}, got "
                         f"{describe(slot_ids)}")
    if not isinstance(scalings, torch.Tensor) or scalings.shape != (num_slots,) \
            or scalings.dtype != torch.float32 or scalings.device != device:
        raise ValueError(f"scalings: expected a float32 tensor of shape ({num_slots},) on {device}, got "
                         f"{describe(scalings)}")
    if ranks is not None and (not isinstance(ranks, torch.Tensor) or ranks.shape != (num_slots,)
                              or ranks.dtype != torch.int32 or ranks.device != device):
        raise ValueError(f"ranks: expected an int32 tensor of shape ({num_slots},) on {device}, got "
                         f"{describe(ranks)}")
    if meta is not None and (not isinstance(meta, LoRAMeta) or meta.num_rows != t
                             or meta.num_slots != num_slots or meta.slot_ids.device != device):
        raise ValueError(f"meta: expected a LoRAMeta built for {t} rows and {num_slots} slots on {device}, "
                         f"got {meta!r}")
    return offsets


def _check_rank_values(ranks: torch.Tensor, max_rank: int) -> None:
    if ranks.numel() == 0 or (ranks.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = (int(v) for v in torch.aminmax(ranks))
    if lo < 0 or hi > max_rank:
        raise ValueError(f"ranks: values must lie in [0, {max_rank}], got min {lo} and max {hi}")
