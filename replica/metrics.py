"""Hooks the engine and the adapter pool call where events happen. No-ops here; the Ray
shell subclasses this to export Prometheus metrics."""

from __future__ import annotations


class EngineMetrics:
    def adapter_hit(self, tier: str) -> None:  # tier: "gpu" | "host"
        pass

    def adapter_miss(self) -> None:
        pass

    def adapter_loaded(self, seconds: float) -> None:
        pass

    def adapter_evicted(self) -> None:
        pass

    def request_finished(self, status: str) -> None:  # "stop" | "length" | "abort" | "error"
        pass

    def tokens(self, prompt: int, generated: int) -> None:
        pass

    def time_to_first_token(self, seconds: float) -> None:
        pass

    def inter_token_latency(self, seconds: float) -> None:
        pass

    def queue(self, waiting: int, running: int, resident_adapters: int) -> None:
        pass
