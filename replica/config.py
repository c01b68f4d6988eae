"""Engine configuration and the adapter a request names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoRARequest:
    """The adapter a request runs with. Residency is keyed on (name, uri, revision), so a
    re-registered adapter (new revision) loads anew while running requests keep the old one."""

    name: str
    uri: str
    revision: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.name, self.uri, self.revision)


@dataclass
class EngineConfig:
    model: str  # a local Hugging Face folder
    load_format: str = "safetensors"  # "dummy": random weights of the config's shape (benchmarks)
    dtype: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 64
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_fraction (GPU) / cpu_kv_cache_bytes
    kv_cache_memory_fraction: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    max_waiting: int = 1024
    max_model_len: int | None = None  # None: the model's own limit
    kernel_backend: str = "auto"
    # Decode attention and the fused norm / rotary / silu kernels: "triton" (what "auto" picks on
    # CUDA) or "torch" (elsewhere; also the CPU twin that the GPU path is checked against).
    attention_backend: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (they are only used on CUDA)
    adapter_cache_dir: str | None = None
    adapter_cache_max_bytes: int | None = None
    s3: Any = None  # storage.S3Options, passed to storage.AdapterStore
    served_model_name: str | None = None
    adapter_load_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras", "max_cpu_loras", "max_lora_rank",
                     "block_size", "max_waiting", "adapter_load_workers"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"EngineConfig.attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"EngineConfig.num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(
                f"EngineConfig.kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}"
            )
