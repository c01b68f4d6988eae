"""Scheduler bounds, FCFS without starvation, and preemption under KV pressure, driven
step by step through the real engine core on the tiny model."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from replica import EngineCore, LoRARequest, SamplingParams
from replica.scheduler import SchedulerOutput
from replica.sequence import Sequence
from replica.testing import make_core

pytestmark = pytest.mark.usefixtures("one_thread")



@dataclass
class Step:
    seqs: list[Sequence]
    num_new: list[int]
    slots: list[int]  # each sequence's adapter slot at that step
    preempted: list[str]


def record_steps(core: EngineCore) -> list[Step]:
    steps: list[Step] = []
    schedule = core.scheduler.schedule

    def spy() -> SchedulerOutput:
        out = schedule()
        steps.append(
            Step(
                list(out.seqs),
                list(out.num_new),
                [s.slot for s in out.seqs],
                [s.request_id for s in out.preempted],
            )
        )
        return out

    core.scheduler.schedule = spy
    return steps


def drive(core: EngineCore, max_steps: int = 5000) -> dict[str, str]:
    """Step until idle (sleeping briefly while adapters load); finish reason per request."""
    reasons: dict[str, str] = {}
    for _ in range(max_steps):
        if not core.has_work:
            return reasons
        results = core.step()
        for seq, out in results:
            assert not isinstance(out, BaseException), out
            if out.finished:
                reasons[seq.request_id] = out.finish_reason
        if not results and not core.last_num_scheduled:
            time.sleep(0.005)
    raise AssertionError("requests did not finish")


def many_adapters(adapters: dict[str, Path], n: int) -> list[LoRARequest]:
    """n distinct adapters (residency is keyed on name, uri, revision) over the tiny set."""
    uris = [str(p) for p in adapters.values()]
    return [LoRARequest(f"tenant{i}", uris[i % len(uris)]) for i in range(n)]


def test_bounds_hold_every_step_and_all_requests_finish(tiny, tmp_path):
    model_dir, adapters = tiny
    core = make_core(model_dir, tmp_path, max_loras=2, max_num_seqs=5, max_num_batched_tokens=24)
    steps = record_steps(core)
    loras = [*many_adapters(adapters, 5), None]
    rng = random.Random(0)
    seqs = []
    for i in range(30):
        params = SamplingParams(max_tokens=rng.randint(1, 6), temperature=0, ignore_eos=True)
        prompt = [rng.randrange(1, 300) for _ in range(rng.randint(1, 20))]
        seqs.append(core.make_sequence(prompt, params, rng.choice(loras), request_id=f"r{i}"))
        core.add(seqs[-1])
    reasons = drive(core)
    assert reasons == {s.request_id: "length" for s in seqs}
    assert all(len(s.output_ids) == s.params.max_tokens for s in seqs)
    for step in steps:
        adapters_in_step = {s.adapter.key for s in step.seqs if s.adapter is not None}
        assert len(adapters_in_step) <= 2
        assert len({slot for slot in step.slots if slot >= 0}) == len(adapters_in_step)
        assert all(
            (slot >= 0) == (s.adapter is not None) for s, slot in zip(step.seqs, step.slots, strict=True)
        )
        assert sum(step.num_new) <= 24 and len(step.seqs) <= 5
    assert max(len({s.adapter for s in st.seqs}) for st in steps) == 3  # two adapters + base rows together
    assert core.blocks.num_free == 256 and core.pool.num_pinned() == 0


def test_a_request_waiting_for_a_slot_is_not_starved(tiny, tmp_path):
    model_dir, adapters = tiny
    core = make_core(model_dir, tmp_path, max_loras=1)
    hot, cold = many_adapters(adapters, 2)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    core.add(core.make_sequence([1, 2, 3], params, hot, request_id="hot0"))
    core.add(cold_seq := core.make_sequence([4, 5, 6], params, cold, request_id="cold"))
    base = core.make_sequence([7, 8], params, None, request_id="base")
    # The hot adapter gets a new request every step; the cold one must still run soon. (Both awaited: the
    # cold adapter's load may end before the base request, added at step 3, has had its 4 tokens.)
    for step in range(200):
        if cold_seq.finished and base.finished:
            break
        core.add(core.make_sequence([1, 2, step % 50 + 1], params, hot, request_id=f"hot{step + 1}"))
        if step == 3:
            core.add(base)
        if not core.step() and not core.last_num_scheduled:
            time.sleep(0.005)
    assert cold_seq.finished and cold_seq.finish_reason == "length", "the cold adapter's request starved"
    assert base.finished  # base-only requests never wait for a slot
    drive(core)
    assert core.pool.num_pinned() == 0


def test_first_come_first_served_among_runnable_requests(tiny, tmp_path):
    model_dir, _ = tiny
    core = make_core(model_dir, tmp_path, max_num_seqs=2)
    steps = record_steps(core)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i in range(6):
        core.add(core.make_sequence([i + 1, 2], params, request_id=f"r{i}"))
    drive(core)
    admitted = [s.request_id for st in steps for s, n in zip(st.seqs, st.num_new, strict=True) if n == 2]
    assert admitted == [f"r{i}" for i in range(6)]


def test_kv_pressure_preempts_the_newest_and_recomputes(tiny, tmp_path):
    model_dir, _ = tiny
    core = make_core(model_dir, tmp_path, num_kv_blocks=6, block_size=4)
    steps = record_steps(core)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seqs = [core.make_sequence([i + 1] * 6, params, request_id=f"r{i}") for i in range(3)]
    for s in seqs:
        core.add(s)
    drive(core)
    preempted = [rid for st in steps for rid in st.preempted]
    assert preempted and preempted[0] == "r2"  # the newest running request goes first
    assert all(len(s.output_ids) == 10 for s in seqs) and core.blocks.num_free == 6
    for s in seqs:  # recomputation gives the same tokens as running alone
        alone = core.make_sequence(s.prompt_ids, params)
        core.add(alone)
        drive(core)
        assert alone.output_ids == s.output_ids


def test_a_step_is_launched_before_the_last_is_collected_and_none_runs_past_max_tokens(tiny, tmp_path):
    model_dir, _ = tiny
    core = make_core(model_dir, tmp_path)
    steps = record_steps(core)
    order: list[tuple[str, int]] = []
    launch = core.runner.launch

    def spy(step: SchedulerOutput):
        sampled, i = launch(step), sum(kind == "launch" for kind, _ in order)
        order.append(("launch", i))
        result = sampled.result
        sampled.result = lambda: (order.append(("collect", i)), result())[1]
        return sampled

    core.runner.launch = spy
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    seqs = [core.make_sequence([i + 1, 2, 3], params, request_id=f"r{i}") for i in range(3)]
    for s in seqs:
        core.add(s)
    assert drive(core) == {s.request_id: "length" for s in seqs}
    launched = [i for kind, i in order if kind == "launch"]
    assert launched == list(range(5))
    for i in launched[1:]:  # the host's work on step i - 1's tokens overlaps step i on the GPU
        assert order.index(("launch", i)) < order.index(("collect", i - 1))
    # Its pending tokens are known to end it: each sequence runs its prefill and 4 decode steps, no more.
    assert all(sum(s in st.seqs for st in steps) == 5 and len(s.output_ids) == 5 for s in seqs)
    assert core.blocks.num_free == 256
