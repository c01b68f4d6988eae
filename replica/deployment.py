"""The Ray Serve shell around one `Engine` (one replica per GPU).

Requests arrive from the router through a Ray handle and leave as plain dicts (the
fields of a RequestOutput, or `{"error": {...}}` with an HTTP status), so the router never
imports this package.

Metrics: every process of the application writes through prometheus-client's multiprocess
mode into one folder per node (PROMETHEUS_MULTIPROC_DIR, set by deploy/app.py), with this
replica's id as the `replica` label. Each replica keeps trying to serve that folder on the
node's metrics port, so exactly one process per node serves the metrics of all of them
(router included) and another takes over if it dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import glob
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from ray import serve

from replica import (
    Engine,
    EngineConfig,
    EngineMetrics,
    InvalidRequest,
    LoRARequest,
    QueueFull,
    SamplingParams,
)

ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
ENV_METRICS_PORT = "LORAFLEET_METRICS_PORT"
ENV_METRICS_HOST = "LORAFLEET_METRICS_HOST"

# storage creates metrics when it is imported, and in multiprocess mode each one is a file in
# the folder: it must exist first.
if os.environ.get(ENV_METRICS_DIR):
    os.makedirs(os.environ[ENV_METRICS_DIR], exist_ok=True)

from storage import AdapterError, AdapterNotFound, StorageUnavailable  # noqa: E402
from storage.cache import pid_alive  # noqa: E402

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ADAPTER_HITS = Counter("lorafleet_adapter_hits", "Requests whose adapter was resident", ["replica", "tier"])
ADAPTER_MISSES = Counter("lorafleet_adapter_misses", "Requests whose adapter had to be fetched", ["replica"])
ADAPTER_LOADS = Counter("lorafleet_adapter_loads", "Adapters loaded into a GPU slot", ["replica"])
ADAPTER_LOAD_SECONDS = Histogram(
    "lorafleet_adapter_load_seconds", "Time to load an adapter", ["replica"], buckets=_LATENCY_BUCKETS
)
ADAPTER_EVICTIONS = Counter("lorafleet_adapter_evictions", "Adapters evicted from a GPU slot", ["replica"])
RESIDENT_ADAPTERS = Gauge(
    "lorafleet_resident_adapters", "Adapters resident in GPU slots", ["replica"], multiprocess_mode="livesum"
)
REQUESTS = Counter("lorafleet_requests", "Finished requests by status", ["replica", "status"])
PROMPT_TOKENS = Counter("lorafleet_prompt_tokens", "Prompt tokens processed", ["replica"])
GENERATED_TOKENS = Counter("lorafleet_generated_tokens", "Tokens generated", ["replica"])
TTFT = Histogram(
    "lorafleet_time_to_first_token_seconds", "Time to first token", ["replica"], buckets=_LATENCY_BUCKETS
)
ITL = Histogram(
    "lorafleet_inter_token_latency_seconds",
    "Time between output tokens",
    ["replica"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_LENGTH = Gauge(
    "lorafleet_queue_length", "Requests waiting to be scheduled", ["replica"], multiprocess_mode="livesum"
)
RUNNING = Gauge(
    "lorafleet_running_sequences", "Sequences in the running batch", ["replica"], multiprocess_mode="livesum"
)


class LiveMultiProcessCollector(MultiProcessCollector):
    """Drops the live gauges of exited processes before collecting, so a dead replica's
    queue length and resident adapters stop being reported."""

    def __init__(self, path: str, registry: CollectorRegistry):
        super().__init__(registry, path)
        self._dir = path

    def collect(self) -> Iterator[Metric]:
        for path in glob.glob(os.path.join(self._dir, "gauge_live*_*.db")):
            pid = int(os.path.basename(path).rsplit("_", 1)[1].removesuffix(".db"))
            if not pid_alive(pid):
                mark_process_dead(pid, self._dir)
        return super().collect()


def serve_node_metrics(path: str, port: int, host: str) -> bool:
    """Serve the folder's metrics on host:port; False when another process already does."""
    registry = CollectorRegistry()
    LiveMultiProcessCollector(path, registry)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    return True


def start_node_exporter(retry_s: float = 10.0) -> None:
    """Keep trying, in the background, to be the node's metrics exporter (env set by deploy/app.py)."""
    path, port = os.environ.get(ENV_METRICS_DIR), int(os.environ.get(ENV_METRICS_PORT, "0"))
    if not path or not port:
        return
    host = os.environ.get(ENV_METRICS_HOST, "0.0.0.0")

    def keep_trying() -> None:
        while not serve_node_metrics(path, port, host):
            threading.Event().wait(retry_s)

    threading.Thread(target=keep_trying, daemon=True, name="lorafleet-metrics").start()


class PrometheusEngineMetrics(EngineMetrics):
    """The engine's metric hooks, exported with a `replica` label."""

    def __init__(self, replica: str):
        self.replica = replica

    def adapter_hit(self, tier: str) -> None:
        ADAPTER_HITS.labels(self.replica, tier).inc()

    def adapter_miss(self) -> None:
        ADAPTER_MISSES.labels(self.replica).inc()

    def adapter_loaded(self, seconds: float) -> None:
        ADAPTER_LOADS.labels(self.replica).inc()
        ADAPTER_LOAD_SECONDS.labels(self.replica).observe(seconds)

    def adapter_evicted(self) -> None:
        ADAPTER_EVICTIONS.labels(self.replica).inc()

    def request_finished(self, status: str) -> None:
        REQUESTS.labels(self.replica, status).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        PROMPT_TOKENS.labels(self.replica).inc(prompt)
        GENERATED_TOKENS.labels(self.replica).inc(generated)

    def time_to_first_token(self, seconds: float) -> None:
        TTFT.labels(self.replica).observe(seconds)

    def inter_token_latency(self, seconds: float) -> None:
        ITL.labels(self.replica).observe(seconds)

    def queue(self, waiting: int, running: int, resident_adapters: int) -> None:
        QUEUE_LENGTH.labels(self.replica).set(waiting)
        RUNNING.labels(self.replica).set(running)
        RESIDENT_ADAPTERS.labels(self.replica).set(resident_adapters)


def error_dict(exc: BaseException) -> dict[str, Any] | None:
    """The HTTP error a request failure answers with; None for a failure that is a bug."""
    if isinstance(exc, InvalidRequest):
        return {"status": 400, "message": str(exc), "param": exc.param}
    if isinstance(exc, QueueFull):
        return {"status": 429, "message": f"The replica's queue is full: {exc}", "retry_after": 1}
    if isinstance(exc, AdapterNotFound):
        return {"status": 404, "message": f"Adapter files not found: {exc}", "code": "adapter_not_found"}
    if isinstance(exc, StorageUnavailable):
        return {"status": 503, "message": f"Adapter storage unavailable: {exc}", "retry_after": 5}
    if isinstance(exc, AdapterError):
        return {"status": 400, "message": f"Adapter cannot be served: {exc}", "code": "invalid_adapter"}
    return None


class EngineReplica:
    """One engine per replica; `record_routing_stats` feeds the placement router."""

    def __init__(self, engine: dict[str, Any]):
        config = EngineConfig(**engine)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else "local"
        self._metrics = PrometheusEngineMetrics(self.replica_id)
        self._engine = Engine(config, metrics=self._metrics)
        self._slots = config.max_loras
        start_node_exporter()

        # Ray Serve's own view of which adapters this replica holds (the multiplexed model
        # ids its default router prefers), kept as large as the GPU slot pool.
        @serve.multiplexed(max_num_models_per_replica=config.max_loras)
        async def hold(adapter_id: str) -> str:
            return adapter_id

        self._hold = hold

    async def generate(
        self, prompt: str | list[int], params: dict[str, Any], adapter: dict[str, Any] | None, request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        # A cancelled stream (the client went away) closes the engine's stream, which aborts
        # the request there and frees its KV blocks and adapter pin.
        try:
            lora = LoRARequest(**adapter) if adapter else None
            if lora is not None:
                await self._hold(lora.name)
            async for out in self._engine.generate(
                prompt, SamplingParams(**params), adapter=lora, request_id=request_id
            ):
                yield {**dataclasses.asdict(out), "replica": self.replica_id}
        except Exception as exc:
            error = error_dict(exc)
            if error is None:
                raise
            yield {"error": error}

    async def validate_adapter(self, uri: str) -> dict[str, Any] | None:
        """Load the adapter through storage (fetch, validate against the base model); the error or None."""
        try:
            await asyncio.to_thread(self._engine.core.pool.store.load, uri)
        except AdapterError as exc:
            return {**(error_dict(exc) or {}), "status": 400}
        return None

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self._engine.stats()
        # Also refresh the gauges: the engine reports them after forward passes only, so an
        # idle engine (after an abort, say) would keep showing its last batch.
        self._metrics.queue(stats["num_waiting"], stats["num_running"], len(stats["resident_adapters"]))
        return {
            "queue_len": stats["num_waiting"] + stats["num_running"],
            "resident_adapters": list(stats["resident_adapters"]),
            "slots": self._slots,
            "reported_at": time.time(),
        }

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, **self._engine.stats()}

    def check_health(self) -> None:
        self._engine.stats()

    async def __del__(self) -> None:
        await self._engine.shutdown()
