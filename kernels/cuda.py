"""The CUDA backend: kernels/csrc built with torch's cpp_extension (ninja) on first use. Same batch
metadata, slice table and split-k partials as the Triton SGMV backend."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from kernels import launch
from kernels.meta import LoRAMeta

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("binding.cpp", "sgmv_bf16.cu", "sgmv_fp16.cu", "sgmv_fp32.cu")
_ext: ModuleType | None = None


def extension() -> ModuleType:
    """Builds (once per machine; torch caches the build) and loads the extension."""
    global _ext
    if _ext is None:
        if not torch.cuda.is_available():
            raise RuntimeError("cuda backend: no CUDA GPU is visible here; use backend='triton_sgmv' or 'torch'")
        from torch.utils.cpp_extension import CUDA_HOME, load

        if CUDA_HOME is None and shutil.which("nvcc") is None:
            raise RuntimeError("cuda backend: building kernels/csrc needs nvcc (the CUDA toolkit); none found, "
                               "set CUDA_HOME or use backend='triton_sgmv'")
        _ext = load(name="lorafleet_sgmv", sources=[str(_CSRC / s) for s in _SOURCES],
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])
    return _ext


def shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta,
           offsets: Sequence[int]) -> torch.Tensor:
    """fp32 partial sums [splits, num_slices, T, max_rank] of x @ A[slot].T per row."""
    ext = _checked_extension(x, lora_a[0].shape[1])
    x, lora_a, lora_b = _unit_stride(x), [_unit_stride(a) for a in lora_a], [_unit_stride(b) for b in lora_b]
    table = launch.slice_table(lora_a, lora_b, offsets)
    (t, k), vec_len = x.shape, 16 // x.element_size()
    vec = k % vec_len == 0 and launch.vector_aligned(x, *lora_a)
    tensor_cores = vec and _tensor_cores(x, meta)
    blocks = meta.blocks(ext.block_rows(lora_a[0].shape[1], tensor_cores))
    # the tensor-core kernel stages `in` 64 at a time; the other reads a warp's 32 vectors per step
    splits, per_split = launch.split_k(k, 64 if tensor_cores else 32 * vec_len, blocks.shape[0] * len(lora_a),
                                       x.device)
    buf = torch.empty(splits, len(lora_a), t, lora_a[0].shape[1], dtype=torch.float32, device=x.device)
    ext.shrink(x, table, blocks, meta.sorted_rows, ranks, buf, per_split, vec, tensor_cores)
    return buf


def expand(y: torch.Tensor, buf: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
           slot_ids: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor | None, meta: LoRAMeta,
           offsets: Sequence[int]) -> None:
    max_rank = lora_a[0].shape[1]
    ext = _checked_extension(y, max_rank)
    lora_a, lora_b = [_unit_stride(a) for a in lora_a], [_unit_stride(b) for b in lora_b]
    table = launch.slice_table(lora_a, lora_b, offsets)
    vec = max_rank % (16 // y.element_size()) == 0 and launch.vector_aligned(*lora_b)
    tensor_cores = vec and _tensor_cores(y, meta)
    blocks = meta.blocks(ext.block_rows(max_rank, tensor_cores))
    out = y if y.stride(1) == 1 else y.contiguous()
    ext.expand(out, buf, table, blocks, meta.sorted_rows, ranks, scalings, max(b.shape[1] for b in lora_b), vec,
               tensor_cores)
    if out is not y:
        y.copy_(out)


def add_lora_cuda(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                  lora_b: Sequence[torch.Tensor], slot_ids: torch.Tensor, scalings: torch.Tensor,
                  ranks: torch.Tensor | None, meta: LoRAMeta, offsets: Sequence[int]) -> None:
    buf = shrink(x, lora_a, lora_b, slot_ids, ranks, meta, offsets)
    expand(y, buf, lora_a, lora_b, slot_ids, scalings, ranks, meta, offsets)


def _checked_extension(t: torch.Tensor, max_rank: int) -> ModuleType:
    ext = extension()
    if not t.is_cuda:
        raise ValueError(f"x: the cuda backend needs CUDA tensors, got one on {t.device}")
    if max_rank > 128:
        raise ValueError(f"lora_a: the cuda backend supports max_rank <= 128, got {max_rank}")
    return ext


def _tensor_cores(t: torch.Tensor, meta: LoRAMeta) -> bool:
    """The WMMA kernels: prefill batches of 16-bit rows on sm_80 and later."""
    return (launch.prefill_tiles(t.shape[0], meta.max_adapters) and t.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(t.device)[0] >= 8)


# The kernels read rows as contiguous runs; other layouts are copied (rare: engine buffers are contiguous).
def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()

