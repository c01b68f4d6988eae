"""AdapterPool: slot contents in the kernel layout, LRU order, pinning, the host tier,
revisions, failures and the metrics hooks, over the real AdapterStore."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import storage
from replica import EngineMetrics, LoRARequest
from replica.adapter_pool import AdapterPool


class CountingStore(storage.AdapterStore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loads: list[str] = []

    def load(self, uri: str) -> storage.LoRAWeights:
        self.loads.append(uri)
        return super().load(uri)


class RecordingMetrics(EngineMetrics):
    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.load_seconds: list[float] = []

    def adapter_hit(self, tier: str) -> None:
        self.events[f"hit_{tier}"] += 1

    def adapter_miss(self) -> None:
        self.events["miss"] += 1

    def adapter_loaded(self, seconds: float) -> None:
        self.load_seconds.append(seconds)

    def adapter_evicted(self) -> None:
        self.events["evicted"] += 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def make_pool(tiny, tmp_path):
    model_dir, _ = tiny
    spec = storage.BaseModelSpec.from_pretrained(model_dir)
    pools = []

    def make(max_loras: int = 2, max_cpu_loras: int = 4, max_rank: int = 16) -> AdapterPool:
        store = CountingStore(spec, cache_dir=tmp_path / "cache", s3=None)
        pool = AdapterPool(
            store,
            spec.module_shapes,
            spec.num_layers,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_rank=max_rank,
            dtype=torch.float32,
            device=torch.device("cpu"),
            metrics=RecordingMetrics(),
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def ready(pool: AdapterPool, *adapters: LoRARequest) -> None:
    for a in adapters:
        pool.request(a)
    deadline = time.monotonic() + 30
    while any(pool.ensure(a) != "ready" for a in adapters):
        assert all(pool.ensure(a) != "failed" for a in adapters), [pool.error(a) for a in adapters]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def lora(adapters: dict[str, Path], name: str, revision: int = 0, uri_of: str | None = None) -> LoRARequest:
    return LoRARequest(name, str(adapters[uri_of or name]), revision)


def test_slot_holds_the_adapter_zero_padded_in_the_kernel_layout(tiny, make_pool):
    _, adapters = tiny
    pool = make_pool()
    a = lora(adapters, "attn8")
    ready(pool, a)
    slot = pool.acquire(a)
    weights = pool.store.load(str(adapters["attn8"]))
    r = weights.rank
    for m in pool.lora_a:
        if m in weights.modules:
            torch.testing.assert_close(pool.lora_a[m][:, slot, :r], weights.lora_a[m].float())
            torch.testing.assert_close(pool.lora_b[m][:, slot, :, :r], weights.lora_b[m].float())
        else:
            assert not pool.lora_a[m][:, slot].any() and not pool.lora_b[m][:, slot].any()
        assert not pool.lora_a[m][:, slot, r:].any() and not pool.lora_b[m][:, slot, :, r:].any()
    assert pool.scalings[slot].item() == pytest.approx(weights.scaling)
    assert pool.ranks[slot].item() == r


def test_lru_eviction_skips_pinned_slots(tiny, make_pool):
    _, adapters = tiny
    pool = make_pool(max_loras=2)
    a, b, c = lora(adapters, "attn8"), lora(adapters, "all4"), lora(adapters, "mlp16")
    ready(pool, a, b, c)
    sa = pool.acquire(a)
    pool.release(sa)
    sb = pool.acquire(b)
    pool.release(sb)
    assert pool.acquire(a) == sa  # a is now the most recently used
    pool.release(sa)
    assert pool.acquire(c) == sb  # so b, the least recently used, makes room
    assert sorted(pool.resident()) == ["attn8", "mlp16"]
    # c is pinned; a is pinned too: nothing can be evicted for b
    assert pool.acquire(a) == sa
    assert pool.acquire(b) is None
    assert sorted(pool.resident()) == ["attn8", "mlp16"]
    pool.release(sa)
    assert pool.acquire(b) == sa  # a was unpinned, c still is
    assert pool.num_pinned() == 2
    assert pool.metrics.events["evicted"] == 2


def test_host_tier_hits_skip_storage(tiny, make_pool):
    _, adapters = tiny
    pool = make_pool(max_loras=1, max_cpu_loras=2)
    a, b, c = lora(adapters, "attn8"), lora(adapters, "all4"), lora(adapters, "mlp16")
    ready(pool, a, b)
    assert len(pool.store.loads) == 2 and pool.metrics.events["miss"] == 2
    pool.release(pool.acquire(a))
    pool.release(pool.acquire(b))  # a leaves the GPU, stays on the host
    pool.request(a)
    pool.request(b)
    assert pool.ensure(a) == "ready" and pool.acquire(a) is not None
    assert pool.metrics.events["hit_host"] == 1 and pool.metrics.events["hit_gpu"] == 1
    assert len(pool.store.loads) == 2  # no storage access for the host-tier hit
    ready(pool, c)  # a third adapter pushes the least recently used (b) off the host tier
    assert sorted(pool.host_names()) == ["attn8", "mlp16"]
    assert len(pool.metrics.load_seconds) == 3 and all(s > 0 for s in pool.metrics.load_seconds)


def test_new_revision_loads_anew_while_the_old_one_stays_pinned(tiny, make_pool):
    _, adapters = tiny
    pool = make_pool(max_loras=2)
    old, new = lora(adapters, "t", 0, uri_of="attn8"), lora(adapters, "t", 1, uri_of="all4")
    ready(pool, old)
    s_old = pool.acquire(old)
    ready(pool, new)
    s_new = pool.acquire(new)
    assert s_old != s_new and pool.ranks[s_old].item() == 8 and pool.ranks[s_new].item() == 4


def test_a_failing_adapter_fails_alone(tiny, make_pool, tmp_path):
    _, adapters = tiny
    pool = make_pool()
    bad = LoRARequest("bad", str(tmp_path / "missing"))
    good = lora(adapters, "attn8")
    pool.request(bad)
    ready(pool, good)
    deadline = time.monotonic() + 30
    while pool.ensure(bad) != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert isinstance(pool.error(bad), storage.AdapterNotFound)
    assert pool.acquire(good) is not None and pool.resident() == ["attn8"]
    too_big = make_pool(max_rank=4)
    big = lora(adapters, "mlp16")  # rank 16 > max_lora_rank 4
    too_big.request(big)
    while too_big.ensure(big) != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "rank" in str(too_big.error(big))
