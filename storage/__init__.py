"""Adapter storage: PEFT LoRA adapters from S3-compatible stores and local folders, validated
against the base model and cached on disk. Imports nothing of the other lorafleet packages."""

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
