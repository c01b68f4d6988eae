"""Adapter storage: PEFT LoRA adapters from S3-compatible stores and local folders, validated
against the base model and cached on disk. Imports nothing of the other lorafleet packages.

    base = BaseModelSpec.from_pretrained("/models/Llama-3-8B")
    store = AdapterStore(base, cache_dir="/var/cache/lorafleet", s3=S3Options(endpoint_url=...))
    weights = store.load("s3://bucket/tenant/adapter")   # or a folder / file:// URI
    weights.lora_a["q_proj"]                             # [num_layers, rank, in_features]

Every refusal is an AdapterError subclass naming the adapter, file, key and what was expected.
Command line: `lorafleet adapters validate|push|ls` (storage/cli.py)."""

from storage.errors import (
    AccessDenied,
    AdapterChanged,
    AdapterError,
    AdapterNotFound,
    AdapterTooLarge,
    AdapterValidationError,
    BaseModelMismatch,
    StorageUnavailable,
    UnsupportedAdapter,
)
from storage.sources import S3Options
from storage.spec import MODULES, BaseModelSpec
from storage.store import AdapterStore
from storage.weights import LoRAWeights

__all__ = [
    "MODULES",
    "AccessDenied",
    "AdapterChanged",
    "AdapterError",
    "AdapterNotFound",
    "AdapterStore",
    "AdapterTooLarge",
    "AdapterValidationError",
    "BaseModelMismatch",
    "BaseModelSpec",
    "LoRAWeights",
    "S3Options",
    "StorageUnavailable",
    "UnsupportedAdapter",
]
