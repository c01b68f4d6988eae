"""The application's config schema (the `args` of serve_config.yaml's application).

A bad config fails at start with ConfigError naming the field, e.g.
`engine.max_loras: Input should be greater than 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A serve config that cannot be used; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """The base model: a local Hugging Face folder, or the built-in demo."""

    path: str | None = None
    demo: bool = False
    name: str | None = Field(default=None, description="the `model` clients name for the base model")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.demo == (self.path is not None):
            raise ValueError("set exactly one of path (a local model folder) or demo: true")
        if self.path is not None and not (Path(self.path).expanduser() / "config.json").is_file():
            raise ValueError(f"path {self.path!r} is not a model folder (no config.json)")
        return self

    def served_name(self) -> str:
        if self.name:
            return self.name
        return "SmolLM2-135M-Instruct" if self.demo else Path(self.path or "").expanduser().resolve().name


class AdaptersConfig(_Section):
    """The adapter registry at start: static id -> URI entries, prefixes whose sub-folders are
    adapters (id = the sub-folder's name), and the three demo adapters."""

    static: dict[str, str] = Field(default_factory=dict)
    prefixes: list[str] = Field(default_factory=list)
    demo: bool = False


class TenantConfig(_Section):
    name: str = Field(min_length=1)
    adapters: list[str] = Field(default_factory=list, description="adapter ids or glob patterns")
    admin: bool = False


class AuthConfig(_Section):
    required: bool = True
    keys_file: str | None = Field(default=None, description="written by `lorafleet keys add`")


class S3Config(_Section):
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"


class EngineOptions(_Section):
    load_format: Literal["safetensors", "dummy"] = Field(
        default="safetensors", description="dummy: random weights of the config's shape (benchmarks)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_num_seqs: int = Field(default=64, gt=0)
    max_num_batched_tokens: int = Field(default=2048, gt=0)
    max_loras: int = Field(default=4, gt=0)
    max_cpu_loras: int = Field(default=16, gt=0)
    max_lora_rank: int = Field(default=64, gt=0)
    num_kv_blocks: int | None = Field(default=None, gt=0)
    kv_cache_memory_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    block_size: int = Field(default=16, gt=0)
    max_waiting: int = Field(default=1024, gt=0)
    max_model_len: int | None = Field(default=None, gt=0)
    kernel_backend: Literal["auto", "torch", "loop", "gather_bmm", "triton_sgmv", "triton_sgmv_pdl", "triton_bgmv", "cuda"] = "auto"
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    enforce_eager: bool = False
    adapter_cache_dir: str | None = None
    s3: S3Config | None = None

    @model_validator(mode="after")
    def _pool_sizes(self) -> EngineOptions:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras (the host tier holds the GPU slots' adapters)")
        return self


class ReplicaOptions(_Section):
    num_replicas: int = Field(default=1, gt=0)
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    max_ongoing_requests: int = Field(default=256, gt=0)


class RouterOptions(_Section):
    policy: Literal["affinity", "default"] = Field(
        default="affinity", description="affinity: router/placement.py; default: Ray Serve's own router"
    )
    epsilon: float = Field(default=0.5, ge=0.0)
    slack: float = Field(default=4.0, ge=0.0)
    affinity_wait_s: float = Field(
        default=1.0, ge=0.0,
        description="a request that waited this long for its adapter's homes gives the adapter with the most "
        "requests waiting on that replica another home (where there is room)",
    )
    routing_stats_period_s: float = Field(default=1.0, gt=0.0)
    num_cpus: float = Field(default=0.5, ge=0.0)
    default_max_tokens: int = Field(default=16, gt=0)
    first_output_timeout_s: float = Field(default=120.0, gt=0.0)
    api_url: str = Field(default="http://127.0.0.1:8000", description="printed in the start-up message")


class MetricsOptions(_Section):
    port: int = Field(default=9464, ge=0, le=65535, description="0 turns the node exporter off")
    host: str = "0.0.0.0"


class FleetConfig(_Section):
    model: ModelConfig
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    replicas: ReplicaOptions = Field(default_factory=ReplicaOptions)
    router: RouterOptions = Field(default_factory=RouterOptions)
    metrics: MetricsOptions = Field(default_factory=MetricsOptions)

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: list[TenantConfig]) -> list[TenantConfig]:
        names = [t.name for t in tenants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tenant names must be unique, repeated: {duplicates}")
        return tenants

    @model_validator(mode="after")
    def _auth_has_tenants(self) -> FleetConfig:
        if self.auth.required and not self.tenants:
            raise ValueError("auth.required is true but no tenants are configured")
        return self


def load_config(args: dict[str, Any]) -> FleetConfig:
    """Validate the application args; ConfigError names every bad field."""
    try:
        return FleetConfig.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid lorafleet config: {problems}") from None
