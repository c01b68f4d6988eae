"""The async Engine: streaming, abort (also by a consumer going away), stats, errors,
queue limits, and a slow adapter fetch that never stalls other requests."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import storage
from replica import (
    Engine,
    EngineConfig,
    EngineMetrics,
    InvalidRequest,
    LoRARequest,
    QueueFull,
    SamplingParams,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class GatedStore(storage.AdapterStore):
    """The real store, whose loads wait for a gate: a slow S3 fetch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def load(self, uri: str) -> storage.LoRAWeights:
        assert self.gate.wait(timeout=60)
        return super().load(uri)


class RecordingMetrics(EngineMetrics):
    def __init__(self) -> None:
        self.finished: list[str] = []
        self.tokens_seen = [0, 0]
        self.ttft: list[float] = []
        self.itl: list[float] = []

    def request_finished(self, status: str) -> None:
        self.finished.append(status)

    def tokens(self, prompt: int, generated: int) -> None:
        self.tokens_seen[0] += prompt
        self.tokens_seen[1] += generated

    def time_to_first_token(self, seconds: float) -> None:
        self.ttft.append(seconds)

    def inter_token_latency(self, seconds: float) -> None:
        self.itl.append(seconds)


def make_engine(model_dir: Path, tmp_path: Path, store=None, metrics=None, **overrides) -> Engine:
    cfg = dict(
        model=str(model_dir), adapter_cache_dir=str(tmp_path / "cache"), num_kv_blocks=128, max_loras=2
    )
    cfg.update(overrides)
    return Engine(EngineConfig(**cfg), store=store, metrics=metrics)


async def collect(engine: Engine, prompt, params: SamplingParams, **kwargs):
    return [out async for out in engine.generate(prompt, params, **kwargs)]


async def settle(engine: Engine, total_blocks: int) -> dict:
    """Wait until the step loop has freed everything; returns the stats."""
    for _ in range(200):
        stats = engine.stats()
        if stats["free_kv_blocks"] == total_blocks and stats["num_running"] == stats["num_waiting"] == 0:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not settle: {engine.stats()}")


def test_generate_streams_text_and_ids(tiny, tmp_path):
    model_dir, adapters = tiny

    metrics = RecordingMetrics()

    async def main():
        engine = make_engine(model_dir, tmp_path, metrics=metrics)
        try:
            params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            outs = await collect(engine, "The quick brown fox", params)
            ids = [t for o in outs for t in o.token_ids]
            assert len(ids) == 6 and all(len(o.token_ids) == 1 for o in outs)
            assert [o.finished for o in outs] == [False] * 5 + [True]
            assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 6
            prompt_len = len(engine.tokenizer("The quick brown fox").input_ids)
            assert outs[-1].prompt_tokens == prompt_len
            assert "".join(o.text for o in outs) == engine.tokenizer.decode(ids, skip_special_tokens=True)
            # token ids in, the same tokens out; and an adapter changes the answer
            again = await collect(engine, engine.tokenizer("The quick brown fox").input_ids, params)
            assert [t for o in again for t in o.token_ids] == ids
            lora = LoRARequest("all4", str(adapters["all4"]))
            tuned = await collect(engine, "The quick brown fox", params, adapter=lora)
            assert [t for o in tuned for t in o.token_ids] != ids
            stats = engine.stats()
            assert stats["resident_adapters"] == ["all4"] and stats["host_adapters"] == ["all4"]
            assert stats["free_kv_blocks"] == stats["total_kv_blocks"] == 128
            assert engine.max_model_len == 256 and engine.model_name == "tiny-llama"
            assert metrics.finished == ["length"] * 3 and metrics.tokens_seen == [3 * prompt_len, 18]
            assert len(metrics.ttft) == 3 and len(metrics.itl) == 15 and min(metrics.ttft + metrics.itl) > 0
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_concurrent_requests_with_adapters_match_sequential(tiny, tmp_path):
    model_dir, adapters = tiny
    loras = [None] + [LoRARequest(n, str(p)) for n, p in adapters.items()]

    async def main():
        engine = make_engine(model_dir, tmp_path, max_loras=3)
        try:
            params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            prompts = [[i + 1, 2 * i + 3, 40 + i] for i in range(8)]
            jobs = [collect(engine, p, params, adapter=loras[i % 4]) for i, p in enumerate(prompts)]
            together = await asyncio.gather(*jobs)
            for i, p in enumerate(prompts):
                alone = await collect(engine, p, params, adapter=loras[i % 4])
                assert [o.token_ids for o in alone] == [o.token_ids for o in together[i]]
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_abort_and_consumer_leaving_free_everything(tiny, tmp_path):
    model_dir, adapters = tiny
    lora = LoRARequest("attn8", str(adapters["attn8"]))

    async def main():
        engine = make_engine(model_dir, tmp_path)
        try:
            params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            outs = []
            async for out in engine.generate([5, 6, 7], params, adapter=lora, request_id="r1"):
                outs.append(out)
                if len(outs) == 2:
                    engine.abort("r1")
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            assert len(outs) < 50
            await settle(engine, 128)

            # A consumer that stops reading and closes the stream aborts the request.
            stream = engine.generate([8, 9, 10], params, adapter=lora, request_id="r2")
            await stream.__anext__()
            await stream.aclose()
            stats = await settle(engine, 128)
            assert stats["resident_adapters"] == ["attn8"]
            assert engine.core.pool.num_pinned() == 0
            # the request id is free again
            done = await collect(engine, [8, 9], SamplingParams(max_tokens=2), request_id="r2")
            assert done[-1].finished
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_bad_config_is_rejected_naming_the_field(tiny):
    model_dir, _ = tiny
    for field, value in [("max_loras", 0), ("block_size", -4), ("kv_cache_memory_fraction", 1.5)]:
        with pytest.raises(ValueError, match=field):
            EngineConfig(model=str(model_dir), **{field: value})
    with pytest.raises(ValueError, match="dtype"):
        Engine(EngineConfig(model=str(model_dir), dtype="int8"))


def test_bad_requests_raise_before_queueing(tiny, tmp_path):
    model_dir, _ = tiny

    async def main():
        engine = make_engine(model_dir, tmp_path)
        try:
            cases = [
                ([1] * 256, SamplingParams(max_tokens=1), "prompt"),
                ([1] * 200, SamplingParams(max_tokens=100), "max_tokens"),
                ([], SamplingParams(), "prompt"),
                ([1, 10**6], SamplingParams(), "prompt"),
                ("hi", SamplingParams(temperature=-1), "temperature"),
                ("hi", SamplingParams(top_p=0), "top_p"),
                ("hi", SamplingParams(max_tokens=0), "max_tokens"),
            ]
            for prompt, params, param in cases:
                with pytest.raises(InvalidRequest) as err:
                    await collect(engine, prompt, params)
                assert err.value.param == param
            assert engine.stats()["num_waiting"] == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_slow_and_failing_adapters_disturb_nothing_else(tiny, tmp_path):
    model_dir, adapters = tiny
    spec = storage.BaseModelSpec.from_pretrained(model_dir)
    store = GatedStore(spec, cache_dir=tmp_path / "cache", s3=None)
    slow = LoRARequest("mlp16", str(adapters["mlp16"]))
    missing = LoRARequest("missing", str(tmp_path / "no-such-adapter"))

    async def main():
        engine = make_engine(model_dir, tmp_path, store=store, max_waiting=3)
        try:
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            waiting = [
                asyncio.create_task(collect(engine, [3, 4, i], params, adapter=slow)) for i in range(3)
            ]
            while engine.stats()["num_waiting"] < 3:
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFull):
                await collect(engine, [1, 2], params)
            store.gate.set()  # the fetch completes: the waiting requests run
            results = await asyncio.gather(*waiting)
            assert all(r[-1].finish_reason == "length" for r in results)
            with pytest.raises(storage.AdapterNotFound):
                await collect(engine, [1, 2], params, adapter=missing)
            store.gate.clear()
            # while a fetch hangs, base-only requests still run
            stuck = asyncio.create_task(
                collect(engine, [3, 4], params, adapter=LoRARequest("x", str(adapters["attn8"])))
            )
            start = time.monotonic()
            base = await collect(engine, [1, 2, 3], params)
            assert base[-1].finished and time.monotonic() - start < 10
            assert not stuck.done()
            store.gate.set()
            assert (await stuck)[-1].finished
        finally:
            store.gate.set()
            await engine.shutdown()

    asyncio.run(main())
