"""One GPU replica's engine: continuous batching over a paged KV cache, an LRU adapter slot
pool, and a Llama-family model whose every targeted layer adds each row's own LoRA."""

from replica.config import EngineConfig, LoRARequest
from replica.engine import Engine, EngineCore, QueueFull
from replica.metrics import EngineMetrics
from replica.sampling import InvalidRequest, SamplingParams
from replica.sequence import RequestOutput

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineMetrics",
    "InvalidRequest",
    "LoRARequest",
    "QueueFull",
    "RequestOutput",
    "SamplingParams",
]
