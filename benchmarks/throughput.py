"""Throughput benchmark: python -m benchmarks.throughput [--tiny] [--quick] [--out DIR] [--plot-only]

Multi-LoRA generation through the replica's EngineCore on a Llama-3-8B-shaped model with random
bf16 weights, in the Punica paper's workloads (identical, uniform, skewed, distinct adapters and
base-only) at batch 1-128: 64-token prompts, 128 generated tokens with EOS ignored, adapters of
rank 16 on all seven projections (and one point with ranks mixed 8/16/64). Each point is set
against the memory-bandwidth roofline of a decode step (base weights + KV read + the distinct
adapters' weights, over the measured bandwidth) and, at batch 8 and 64, against transformers +
PEFT's mixed-batch generate in the same run. Also: time to first token of requests whose adapter
is resident, alone and while other requests' adapters load; closed-loop arrivals (each client sends its
next request when its last ends), base-only and uniform; the engine's CUDA-graph / Triton path
against its eager / PyTorch twin (same greedy tokens); benchmarks.engine's transformers check.
--tiny runs the same code with small shapes (the CPU check); --quick only batch 8 and 64.
Writes <out>/throughput.json and .png (--plot-only draws the PNG from an existing JSON)."""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.engine import (
    LLAMA3_8B,
    RANK,
    TINY,
    RandomAdapterStore,
    dtype_name,
    first_difference,
    free_memory,
    greedy_check,
    hf_projection,
    make_check_llama,
    run,
    write_dummy_model,
)
from replica import EngineConfig, EngineCore, LoRARequest, SamplingParams
from storage import BaseModelSpec

WORKLOADS = ("base_only", "identical", "uniform", "skewed", "distinct")
BATCHES, QUICK_BATCHES = (1, 8, 32, 64, 128), (8, 64)
ZIPF_EXPONENT, SEED = 1.5, 0
MIXED_RANKS = (8, 16, 64)
BASELINE_BATCHES, BASELINE_WORKLOADS = (8, 64), ("base_only", "identical", "uniform")
TARGET_BATCH = 64  # the targets are stated at batch 64
TARGET_REPEATS = 3
# What chat clients send (OpenAI's default temperature is 1): the sampled point beside the greedy ones.
SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
ARRIVAL_WORKLOADS, ARRIVAL_ROUNDS = ("base_only", "uniform"), 7  # arrivals_point
LOAD_WORKERS = 8  # background adapter loads, so that 128 adapters are ready in seconds
_START = time.perf_counter()


def log(*parts: Any) -> None:
    """A progress line (seconds since start), flushed: a run cut short still shows where it got."""
    print(f"[{time.perf_counter() - _START:6.1f}s]", *parts, flush=True)


@dataclass(frozen=True)
class Sizes:
    config: dict
    prompt_len: int
    gen_len: int
    baseline_gen_len: int
    batches: tuple[int, ...]
    ttft_trials: int


def tenant(i: int | str) -> LoRARequest:
    return LoRARequest(f"tenant{i}", f"random://{i}")


def workload_adapters(workload: str, batch: int) -> list[LoRARequest | None]:
    """Each row's adapter (None: base model) in one of Punica's workloads."""
    if workload == "base_only":
        return [None] * batch
    if workload == "identical":
        ids = [0] * batch
    elif workload == "uniform":  # round(sqrt(batch)) adapters, equally popular, rows round-robin
        ids = [i % max(1, round(math.sqrt(batch))) for i in range(batch)]
    elif workload == "skewed":  # Zipf over `batch` candidates: adapter k drawn with weight (k + 1)^-1.5
        ids = random.Random(SEED).choices(range(batch), common.zipf_weights(batch, ZIPF_EXPONENT), k=batch)
    elif workload == "distinct":
        ids = list(range(batch))
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    return [tenant(i) for i in ids]


@dataclass(frozen=True)
class Roofline:
    """Bytes a decode step must read from memory at the least, and the time that takes."""

    bandwidth: float  # bytes/s, measured
    base_bytes: int  # every weight but the embedding (only T rows of it are read); the lm_head included
    kv_bytes_per_token: int  # K and V of one token in every layer
    adapter_bytes_per_rank: int  # one adapter of rank 1 on all seven projections of every layer

    @classmethod
    def of(cls, core: EngineCore, bandwidth: float) -> Roofline:
        model, args = core.model, core.model.args
        weights = sum(p.nbytes for p in model.parameters())  # a tied lm_head is the embedding: counted once
        base = weights - (0 if args.tie_word_embeddings else model.embed_tokens.nbytes)
        kv = 2 * args.num_layers * args.num_kv_heads * args.head_dim * core.dtype.itemsize
        spec = BaseModelSpec.from_pretrained(core.config.model)
        per_rank = spec.num_layers * sum(i + o for i, o in spec.module_shapes.values()) * core.dtype.itemsize
        return cls(bandwidth, base, kv, per_rank)

    def step(self, batch: int, context: float, ranks: list[int]) -> dict:
        """The floor of a decode step of batch rows over an average context, with these adapters."""
        kv = round(batch * context * self.kv_bytes_per_token)
        adapters = sum(ranks) * self.adapter_bytes_per_rank
        total = self.base_bytes + kv + adapters
        return {"bytes": {"base": self.base_bytes, "kv": kv, "adapters": adapters, "total": total},
                "step_ms": total / self.bandwidth * 1e3}  # fmt: skip


def load_adapters(core: EngineCore, adapters: list[LoRARequest | None]) -> None:
    """Load adapters into GPU slots before a timed run, so that it measures steady-state serving."""
    pending = list(dict.fromkeys(a for a in adapters if a is not None))
    if len(pending) > len(core.pool.scalings):
        raise ValueError(f"{len(pending)} adapters do not fit in max_loras={len(core.pool.scalings)} slots")
    for a in pending:
        core.pool.request(a)
    while pending:
        for a in list(pending):
            state = core.pool.ensure(a)
            if state == "failed":
                raise RuntimeError(f"adapter {a.name} failed to load") from core.pool.error(a)
            # Ready on the host: copy it into a slot now, not in the timed run. None: the host tier
            # dropped it meanwhile for a newer load; the next ensure() loads it again.
            slot = core.pool.acquire(a) if state == "ready" else None
            if slot is not None:
                core.pool.release(slot)
                pending.remove(a)
        time.sleep(0.005)


def measure_point(
    core: EngineCore,
    prompts: list[list[int]],
    adapters: list[LoRARequest | None],
    gen_len: int,
    roofline: Roofline,
    rank_of: dict[str, int],
    sampling: dict[str, Any] | None = None,
) -> dict:
    """One workload at one batch size, greedy unless `sampling` sets SamplingParams fields."""
    load_adapters(core, adapters)
    params = {"temperature": 0, "ignore_eos": True, **(sampling or {})}
    # Warm-up: the batch's prefill and decode shapes (CUDA graphs of its bucket, kernels compiled).
    run(core, prompts, SamplingParams(max_tokens=3, **params), adapters)
    timed = run(core, prompts, SamplingParams(max_tokens=gen_len, **params), adapters)
    distinct = list(dict.fromkeys(a for a in adapters if a is not None))
    prompt_len = len(prompts[0])
    # decode step j (1 .. gen_len-1) attends over prompt_len + j tokens: prompt_len + gen_len/2 on average
    floor = roofline.step(
        len(prompts), prompt_len + gen_len / 2, [rank_of.get(a.uri, RANK) for a in distinct]
    )
    step_ms = timed["decode_step_ms"]
    return {
        "decode_graph_ms": decode_graph_ms(core, len(prompts), len(distinct)),
        "batch": len(prompts),
        "num_adapters": len(distinct),
        "tokens_per_s": timed["tokens_per_s"],
        "decode_tokens_per_s": timed["decode_tokens_per_s"],
        "decode_step_ms": step_ms,
        "ttft_ms": timed["time_to_first_token_ms"],
        "roofline_step_ms": _significant(floor["step_ms"]),
        "roofline_tokens_per_s": round(len(prompts) / floor["step_ms"] * 1e3, 1),
        "roofline_fraction": _significant(floor["step_ms"] / step_ms),
        "roofline_bytes": floor["bytes"],
        "run": timed,
    }


def decode_graph_ms(core: EngineCore, batch: int, num_adapters: int) -> float | None:
    """GPU time of one decode step alone (None without CUDA graphs): the step's captured graph replayed on
    the last step's inputs, still in its static buffer (the sequences have finished, so the replays only
    rewrite K/V nobody reads). decode_step_ms adds the host's share of a step (scheduling, sampling,
    detokenizing), which every workload pays about alike and which therefore raises the ratios between them."""
    graphs = core.runner.graphs
    if graphs is None:
        return None
    rows = graphs.bucket(batch)
    return _significant(common.eager_time_us(lambda: graphs.replay(rows, num_adapters), reps=30,
                                             cold_l2=False) / 1e3)  # fmt: skip


def _significant(x: float) -> float:
    return float(f"{x:.4g}")  # on the CPU a fraction is ~1e-4: fixed decimals would round it to 0


def engine_config(
    model_dir: Path, dtype: torch.dtype, device: str, sizes: Sizes, batch: int, **overrides: Any
) -> EngineConfig:
    """Room for batch requests, each adapter of its own: every prompt prefills in one step, KV blocks
    sized from the lengths (not from the memory fraction)."""
    seq_len = sizes.prompt_len + sizes.gen_len
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), load_format="dummy", dtype=dtype_name(dtype), device=device, max_num_seqs=batch,
        max_num_batched_tokens=batch * sizes.prompt_len, max_loras=batch, max_cpu_loras=32,
        max_lora_rank=RANK, num_kv_blocks=batch * -(-seq_len // 16), block_size=16,
        adapter_load_workers=LOAD_WORKERS,
    )  # fmt: skip
    return EngineConfig(**{**kwargs, **overrides})


def serve_points(
    model_dir: Path, prompts: list[list[int]], sizes: Sizes, device: str, dtype: torch.dtype, bandwidth: float
) -> dict:
    """Every workload at every batch size through one EngineCore, then the loads-off-the-loop check."""
    spec = BaseModelSpec.from_config(sizes.config)
    start = time.perf_counter()
    core = EngineCore(engine_config(model_dir, dtype, device, sizes, max(sizes.batches)),
                      store=RandomAdapterStore(spec.module_shapes, spec.num_layers))  # fmt: skip
    log(f"engine ready in {time.perf_counter() - start:.1f} s")
    roofline = Roofline.of(core, bandwidth)
    log(f"roofline: {roofline}")
    points: dict[str, list[dict]] = {w: [] for w in WORKLOADS}
    for batch in sizes.batches:
        # The targets' batch is measured TARGET_REPEATS times, the workloads interleaved so that a drift of
        # the machine hits them alike; its point is the median run.
        runs: dict[str, list[dict]] = {w: [] for w in WORKLOADS}
        for _ in range(TARGET_REPEATS if batch == TARGET_BATCH else 1):
            for workload in WORKLOADS:
                point = measure_point(core, prompts[:batch], workload_adapters(workload, batch), sizes.gen_len,
                                      roofline, {})  # fmt: skip
                runs[workload].append(point)
                log(f"{workload} batch {batch}: {point['tokens_per_s']} tok/s, step {point['decode_step_ms']} ms "
                      f"(GPU alone {point['decode_graph_ms']} ms) "
                      f"(roofline {point['roofline_step_ms']} ms, {point['roofline_fraction']:.2f}), "
                      f"ttft {point['ttft_ms']} ms")  # fmt: skip
        for workload, measured in runs.items():
            median = sorted(measured, key=lambda p: p["tokens_per_s"])[len(measured) // 2]
            points[workload].append({**median, "repeats_tokens_per_s": [p["tokens_per_s"] for p in measured]})
    sampled = sampled_point(core, prompts, sizes, roofline, points["uniform"])
    loads = ttft_during_loads(core, prompts[0], sizes.ttft_trials)
    log("time to first token, resident adapter:", loads)
    arrivals = {w: arrivals_point(core, prompts, sizes, w, points[w]) for w in ARRIVAL_WORKLOADS}
    core.pool.shutdown()
    return {
        "kv_blocks": core.blocks.num_blocks,
        "roofline_inputs": {"base_weight_bytes": roofline.base_bytes,
                            "kv_bytes_per_token": roofline.kv_bytes_per_token,
                            "adapter_bytes_per_rank": roofline.adapter_bytes_per_rank},
        "points": points,
        "sampled": sampled,
        "loads_off_step_loop": loads,
        "arrivals": arrivals,
    }  # fmt: skip


def sampled_point(core: EngineCore, prompts: list[list[int]], sizes: Sizes, roofline: Roofline,
                  greedy: list[dict]) -> dict:
    """The uniform workload at the targets' batch with SAMPLED sampling, against its greedy point: what
    sampling costs a step."""
    batch = min(TARGET_BATCH, max(sizes.batches))
    point = measure_point(core, prompts[:batch], workload_adapters("uniform", batch), sizes.gen_len, roofline, {},
                          sampling=SAMPLED)  # fmt: skip
    base = next(p for p in greedy if p["batch"] == batch)
    out = {"sampling": SAMPLED, "batch": batch, "tokens_per_s": point["tokens_per_s"],
           "decode_step_ms": point["decode_step_ms"], "greedy_tokens_per_s": base["tokens_per_s"],
           "greedy_decode_step_ms": base["decode_step_ms"],
           "over_greedy": _significant(point["tokens_per_s"] / base["tokens_per_s"])}  # fmt: skip
    log(f"uniform batch {batch}, sampled {SAMPLED}:", out)
    return out


def ttft_during_loads(core: EngineCore, prompt: list[int], trials: int, loads_per_trial: int = 4) -> dict:
    """Time to first token of a request whose adapter is resident: alone, and right after requests
    whose adapters are not loaded yet (the pool loads them on its threads while we keep stepping).
    The two kinds of trial alternate, so that drift hits both alike."""
    resident = tenant(0)
    load_adapters(core, [resident])
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    others = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    alone: list[float] = []
    during: list[float] = []
    in_flight: list[int] = []
    for trial in range(trials):
        for with_loads in (False, True):
            fresh = [tenant(f"fresh-{trial}-{k}") for k in range(loads_per_trial)] if with_loads else []
            for a in fresh:
                core.add(core.make_sequence(prompt, others, a))
            seq = core.make_sequence(prompt, params, resident)
            start = time.perf_counter()
            core.add(seq)
            while not seq.output_ids and seq.request_id in core.requests:
                core.step()
            if not seq.output_ids:
                raise RuntimeError(f"the request on a resident adapter ended without a token: {seq.error!r}")
            (during if with_loads else alone).append((time.perf_counter() - start) * 1e3)
            if with_loads:  # evidence that loads were under way while the request ran
                in_flight.append(sum(core.pool.ensure(a) == "loading" for a in fresh))
            while core.has_work:  # the loaded adapters' requests run too; nothing is left behind
                if not core.step() and core.last_num_scheduled == 0:
                    time.sleep(0.002)
    median_alone, median_during = statistics.median(alone), statistics.median(during)
    return {
        "trials": trials, "loads_per_trial": loads_per_trial,
        "load_workers": core.config.adapter_load_workers,  # more than the default 2: harsher on the loop
        "ttft_alone_ms": [round(t, 2) for t in alone], "ttft_during_loads_ms": [round(t, 2) for t in during],
        "median_alone_ms": round(median_alone, 2), "median_during_loads_ms": round(median_during, 2),
        "ratio": round(median_during / median_alone, 3),
        "loads_in_flight_at_first_token": in_flight,
        "free_kv_blocks_after": core.blocks.num_free, "total_kv_blocks": core.blocks.num_blocks,
    }  # fmt: skip


def arrivals_point(core: EngineCore, prompts: list[list[int]], sizes: Sizes, workload: str,
                   lockstep: list[dict]) -> dict:
    """Serving as it happens: TARGET_BATCH clients, each sending its next request when its last one ends,
    max_tokens drawn from [gen_len / 2, 3 gen_len / 2], ARRIVAL_ROUNDS requests per client. New prompts
    then join running decodes (a step of both runs eagerly: the decode graphs take one token per row),
    which the lockstep points above never do. Against the lockstep point of the same batch."""
    batch = min(TARGET_BATCH, max(sizes.batches))
    rows = workload_adapters(workload, batch)
    load_adapters(core, rows)
    rng = random.Random(SEED)
    kinds: dict[str, list[float]] = {"decode": [], "mixed": []}  # seconds of each step, by what it launched
    schedule = core.scheduler.schedule
    launched: list[str] = []

    def spy() -> Any:
        out = schedule()
        if not out.empty:
            launched.append("decode" if all(n == 1 for n in out.num_new) else "mixed")
        return out

    def submit(i: int) -> None:
        params = SamplingParams(max_tokens=rng.randint(sizes.gen_len // 2, 3 * sizes.gen_len // 2),
                                temperature=0, ignore_eos=True)  # fmt: skip
        core.add(core.make_sequence(prompts[i % len(prompts)], params, rows[i % batch]))

    core.scheduler.schedule = spy
    try:
        for rounds in (1, ARRIVAL_ROUNDS):  # the first: warm-up (kernels of the step shapes compiled)
            for v in kinds.values():
                v.clear()
            sent = generated = 0
            for _ in range(batch):
                submit(sent)
                sent += 1
            start = time.perf_counter()
            while core.has_work:
                launched.clear()
                t0 = time.perf_counter()
                results = core.step()
                if launched:
                    kinds[launched[0]].append(time.perf_counter() - t0)
                for _, out in results:
                    generated += len(out.token_ids)
                    if out.finished and sent < rounds * batch:
                        submit(sent)
                        sent += 1
            seconds = time.perf_counter() - start
    finally:
        core.scheduler.schedule = schedule
    same_batch = next(p for p in lockstep if p["batch"] == batch)
    out = {"clients": batch, "requests": sent, "generated_tokens": generated, "seconds": round(seconds, 3),
           "tokens_per_s": round(generated / seconds, 1), "lockstep_tokens_per_s": same_batch["tokens_per_s"],
           "over_lockstep": _significant(generated / seconds / same_batch["tokens_per_s"]),
           "steps": {k: {"count": len(v), "ms_per_step": round(statistics.fmean(v) * 1e3, 3) if v else None}
                     for k, v in kinds.items()}}  # fmt: skip
    log(f"arrivals, {workload}:", out)
    return out


def mixed_rank_point(
    model_dir: Path, prompts: list[list[int]], sizes: Sizes, device: str, dtype: torch.dtype, bandwidth: float
) -> dict:
    """The uniform workload at batch 64 with adapter ranks mixed 8/16/64 (slots sized at rank 64)."""
    rows = workload_adapters("uniform", TARGET_BATCH)
    distinct = list(dict.fromkeys(rows))
    rank_of = {a.uri: MIXED_RANKS[i % len(MIXED_RANKS)] for i, a in enumerate(distinct)}
    spec = BaseModelSpec.from_config(sizes.config)
    cfg = engine_config(model_dir, dtype, device, sizes, TARGET_BATCH, max_loras=len(distinct),
                        max_lora_rank=max(MIXED_RANKS))  # fmt: skip
    core = EngineCore(cfg, store=RandomAdapterStore(spec.module_shapes, spec.num_layers, ranks=rank_of))
    point = measure_point(
        core, prompts[:TARGET_BATCH], rows, sizes.gen_len, Roofline.of(core, bandwidth), rank_of
    )
    core.pool.shutdown()
    point["adapter_ranks"] = [rank_of[a.uri] for a in distinct]
    log("uniform, mixed ranks, batch 64:", point["tokens_per_s"], "tok/s")
    return point


def peft_baseline(
    model_dir: Path, prompts: list[list[int]], sizes: Sizes, device: str, dtype: torch.dtype
) -> dict:
    """transformers + PEFT on the same shape: random weights built on the device, our adapters'
    weights copied into PEFT's LoRA layers; each workload on PEFT's own fastest path for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = BaseModelSpec.from_config(sizes.config)
    store = RandomAdapterStore(spec.module_shapes, spec.num_layers)
    log("transformers + PEFT: building the model")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    needed = dict.fromkeys(a for w in BASELINE_WORKLOADS for b in BASELINE_BATCHES
                           for a in workload_adapters(w, b) if a is not None)  # fmt: skip
    peft_model: Any = None
    for adapter in needed:
        lora = store.load(adapter.uri)
        # PEFT scales by lora_alpha / r: alpha = scaling * r gives our adapter's scaling.
        config = LoraConfig(r=lora.rank, lora_alpha=lora.scaling * lora.rank, target_modules=list(lora.modules),
                            lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
        if peft_model is None:  # bf16 adapters, as served (PEFT would upcast them to fp32 for training)
            peft_model = get_peft_model(
                model, config, adapter_name=adapter.name, autocast_adapter_dtype=False
            )
        else:
            peft_model.add_adapter(adapter.name, config, autocast_adapter_dtype=False)
        copy_lora_weights(peft_model, adapter.name, lora)
    peft_model.eval()
    log(f"transformers + PEFT: {len(needed)} adapters added")
    points: dict[str, list[dict]] = {w: [] for w in BASELINE_WORKLOADS}
    for workload in BASELINE_WORKLOADS:
        warm_up = workload_adapters(workload, BASELINE_BATCHES[0])[:2]  # the workload's path, two rows
        hf_generate(peft_model, prompts[:2], warm_up, 2, device)
        for batch in BASELINE_BATCHES:
            rows = workload_adapters(workload, batch)
            point = hf_generate(peft_model, prompts[:batch], rows, sizes.baseline_gen_len, device)
            points[workload].append({"batch": batch, "num_adapters": len(set(rows) - {None}), **point})
            log(f"transformers + PEFT {workload} batch {batch}: {point['tokens_per_s']} tok/s")
    del peft_model, model
    free_memory()
    return {
        "gen_len": sizes.baseline_gen_len,
        "method": "base_only: generate under disable_adapter(); identical: set_adapter() then generate; "
                  "uniform: generate(adapter_names=[...]) (PEFT's mixed-batch inference); "
                  "greedy, EOS ignored, bf16 adapters (autocast_adapter_dtype=False), sdpa attention",
        "points": points,
    }  # fmt: skip


def copy_lora_weights(peft_model: Any, name: str, lora: Any) -> None:
    layers = peft_model.base_model.model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for m in lora.modules:
                linear = hf_projection(layer, m)
                linear.lora_A[name].weight.copy_(lora.lora_a[m][i])
                linear.lora_B[name].weight.copy_(lora.lora_b[m][i])
                if linear.scaling[name] != lora.scaling:
                    raise RuntimeError(f"PEFT scaling {linear.scaling[name]} != {lora.scaling} for {name}")


def hf_generate(
    peft_model: Any, prompts: list[list[int]], rows: list[LoRARequest | None], gen_len: int, device: str
) -> dict:
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, do_sample=False,
                  eos_token_id=None, pad_token_id=0)  # fmt: skip
    names = {a.name for a in rows if a is not None}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        if not names:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, **kwargs)
        elif len(names) == 1 and None not in rows:
            peft_model.set_adapter(next(iter(names)))
            out = peft_model.generate(input_ids=ids, **kwargs)
        else:
            adapter_names = [a.name if a is not None else "__base__" for a in rows]
            out = peft_model.generate(input_ids=ids, adapter_names=adapter_names, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    generated = len(prompts) * (out.shape[1] - ids.shape[1])
    return {
        "generated_tokens": generated,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 1),
    }


def twin_check(device: str, dtype: torch.dtype, tmp: Path) -> dict:
    """Greedy tokens of a mixed batch (base rows and three adapters, prompts of different lengths,
    rows finishing at different steps so that decode runs at batch 6 down to 1) with the default
    settings (on CUDA: decode CUDA graphs and Triton attention) against the eager PyTorch twin
    (enforce_eager, attention_backend="torch"): they must be the same tokens."""
    rows = [None, tenant("twin-0"), None, tenant("twin-1"), tenant("twin-0"), tenant("twin-2")]
    lengths, max_tokens = [5, 9, 17, 23, 31, 40], [32, 12, 27, 20, 32, 7]
    model_dir = make_check_llama(tmp / dtype_name(dtype), dtype)
    spec = BaseModelSpec.from_pretrained(model_dir)
    store = RandomAdapterStore(spec.module_shapes, spec.num_layers, rank=8, std=0.1)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    tokens = {}
    for setting, overrides in (
        ("default", {}),
        ("eager_torch", {"enforce_eager": True, "attention_backend": "torch"}),
    ):
        cfg = EngineConfig(model=str(model_dir), dtype=dtype_name(dtype), device=device, num_kv_blocks=64,
                           max_loras=4, **overrides)  # fmt: skip
        core = EngineCore(cfg, store=store)
        load_adapters(core, rows)
        seqs = [
            core.make_sequence(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), a)
            for p, n, a in zip(prompts, max_tokens, rows, strict=True)
        ]
        for s in seqs:
            core.add(s)
        while core.has_work:
            core.step()
        core.pool.shutdown()
        tokens[setting] = [s.output_ids for s in seqs]
    diffs = [first_difference(a, b) for a, b in zip(tokens["default"], tokens["eager_torch"], strict=True)]
    return {"rows": len(rows), "max_tokens": max_tokens, "equal": all(d is None for d in diffs),
            "first_difference": diffs}  # fmt: skip


def targets(points: dict, baseline: dict, loads: dict, twin: dict, greedy: dict) -> dict:
    def at(table: dict, workload: str) -> dict:
        return next(p for p in table[workload] if p["batch"] == TARGET_BATCH)

    base, uniform, distinct = (at(points, w) for w in ("base_only", "uniform", "distinct"))
    peft_mixed = at(baseline["points"], "uniform")["tokens_per_s"] if "points" in baseline else None
    figures = {
        "base_only_roofline_fraction": (base["roofline_fraction"], 0.6),
        "uniform_vs_base_only": (uniform["tokens_per_s"] / base["tokens_per_s"], 0.9),
        "distinct_vs_base_only": (distinct["tokens_per_s"] / base["tokens_per_s"], 0.8),
        "uniform_vs_peft_mixed": (uniform["tokens_per_s"] / peft_mixed if peft_mixed else None, 30.0),
    }
    out: dict[str, Any] = {
        name: {"value": None if value is None else round(value, 3), "target": f">= {goal}",
               "met": value is not None and value >= goal, "batch": TARGET_BATCH}
        for name, (value, goal) in figures.items()
    }  # fmt: skip
    if base["decode_graph_ms"]:  # the GPU's share alone: what the kernels decide, without the host's
        for name, point in (("uniform_vs_base_only", uniform), ("distinct_vs_base_only", distinct)):
            out[name]["gpu_only_value"] = round(base["decode_graph_ms"] / point["decode_graph_ms"], 3)
    out["ttft_resident_unaffected_by_loads"] = {
        "value": loads["ratio"], "target": "median during loads <= 1.25 x median alone", "met": loads["ratio"] <= 1.25,
    }  # fmt: skip
    fp32_greedy = greedy.get("float32", {})
    out["twin_check_same_tokens"] = {"dtype": "float32", "met": twin.get("float32", {}).get("equal") is True}
    out["greedy_matches_transformers"] = {
        "dtype": "float32", "met": "error" not in fp32_greedy and all(r["equal"] for r in fp32_greedy.values())
    }  # fmt: skip
    return out


def ratios(points: dict, baseline: dict) -> list[dict]:
    out = []
    for workload, table in baseline.get("points", {}).items():
        for theirs in table:
            ours = next(p for p in points[workload] if p["batch"] == theirs["batch"])
            out.append({"workload": workload, "batch": theirs["batch"], "ours_tokens_per_s": ours["tokens_per_s"],
                        "baseline_tokens_per_s": theirs["tokens_per_s"],
                        "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)})  # fmt: skip
    return out


def guarded(name: str, fn: Any, *args: Any) -> dict:
    """A check that fails goes into the JSON as its traceback; the measurements still run."""
    try:
        result = fn(*args)
    except Exception:
        result = {"error": traceback.format_exc()}
    log(f"{name}:", json.dumps(result)[:2000])
    return result


def plot(results: dict) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_frac) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(WORKLOADS, ("#888", "#4a8", "#48c", "#c84", "#a4a"), strict=True))
    for workload, table in results["points"].items():
        batches = [p["batch"] for p in table]
        ax_tps.plot(batches, [p["tokens_per_s"] for p in table], "o-", color=colors[workload], label=workload)
        ax_tps.plot(
            batches, [p["roofline_tokens_per_s"] for p in table], "--", color=colors[workload], alpha=0.6
        )
        ax_frac.plot(
            batches, [p["roofline_fraction"] for p in table], "o-", color=colors[workload], label=workload
        )
    for workload, table in results["baseline"].get("points", {}).items():
        ax_tps.plot([p["batch"] for p in table], [p["tokens_per_s"] for p in table], "x:", color=colors[workload],
                    label=f"transformers+PEFT {workload}")  # fmt: skip
    mixed = results["mixed_ranks"]
    if "tokens_per_s" in mixed:
        ax_tps.plot(
            [mixed["batch"]], [mixed["tokens_per_s"]], "*", ms=12, color="k", label="uniform, ranks 8/16/64"
        )
    for ax in (ax_tps, ax_frac):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (requests)")
        ax.grid(alpha=0.3)
    ax_tps.set_yscale("log")
    ax_tps.set_ylabel("generated tokens / s")
    ax_tps.set_title("tokens/s (dashed: bandwidth roofline of a decode step)", fontsize=9)
    ax_tps.legend(fontsize=7)
    ax_frac.set_ylabel("roofline step time / our decode step time")
    ax_frac.set_ylim(0, 1.05)
    ax_frac.set_title("decode step, fraction of the roofline", fontsize=9)
    ax_frac.legend(fontsize=7)
    fig.suptitle(f"{results['model']}, {results['prompt_len']}+{results['gen_len']} tokens, rank {RANK} on all "
                 f"7 projections; {results['device']}", fontsize=10)  # fmt: skip
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (the CPU check)")
    parser.add_argument("--quick", action="store_true", help="batch 8 and 64 only")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--plot-only", action="store_true", help="draw throughput.png from throughput.json")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((args.out / "throughput.json").read_text())).savefig(
            args.out / "throughput.png", dpi=110, bbox_inches="tight"
        )
        return
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tiny = args.tiny or not cuda
    batches = QUICK_BATCHES if args.quick else BATCHES
    sizes = Sizes(TINY, 16, 8, 4, batches, 2) if tiny else Sizes(LLAMA3_8B, 64, 128, 32, batches, 8)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # fp32 decides (bf16 runs differ by rounding: a different summation order flips greedy ties);
        # bf16 is reported beside it.
        check_dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
        greedy = {
            dtype_name(d): guarded(f"greedy check {dtype_name(d)} (engine vs transformers)", greedy_check, device,
                                   d, tmp / f"greedy-{dtype_name(d)}")
            for d in check_dtypes
        }  # fmt: skip
        twin: dict[str, Any] = {
            dtype_name(d): guarded(f"twin check {dtype_name(d)} (graphs + triton vs eager + torch)", twin_check,
                                   device, d, tmp / "twin")
            for d in check_dtypes
        }  # fmt: skip
        free_memory()
        bandwidth = common.hbm_bandwidth_bytes_per_s(device)
        log(f"bandwidth: {bandwidth / 1e9:.0f} GB/s")
        model_dir = write_dummy_model(sizes.config, tmp / "bench-model")
        gen = torch.Generator().manual_seed(SEED)
        vocab = sizes.config["vocab_size"]
        prompts = [
            torch.randint(0, vocab, (sizes.prompt_len,), generator=gen).tolist() for _ in range(max(batches))
        ]
        # the baseline first, then freed: both fit
        baseline = guarded("transformers + PEFT", peft_baseline, model_dir, prompts, sizes, device, dtype)
        free_memory()
        ours = serve_points(model_dir, prompts, sizes, device, dtype, bandwidth)
        free_memory()
        mixed = guarded("mixed ranks", mixed_rank_point, model_dir, prompts, sizes, device, dtype, bandwidth)
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "dtype": dtype_name(dtype),
        "model": "tiny random Llama" if tiny else "Llama-3-8B-shaped, random weights",
        "prompt_len": sizes.prompt_len, "gen_len": sizes.gen_len, "batches": list(batches),
        "adapters": f"rank {RANK} on all 7 projections, scaling 2.0; workloads: identical (1 adapter), uniform "
                    f"(round(sqrt(batch)), round-robin), skewed (Zipf {ZIPF_EXPONENT} over batch candidates, "
                    f"seed {SEED}), distinct (one per row), base_only",
        "bandwidth": {"bytes_per_s": round(bandwidth), "method": " ".join(common.hbm_bandwidth_bytes_per_s.__doc__.split())},
        "roofline": "decode step floor = (base weights without the embedding + KV of batch x (prompt_len + gen_len/2) "
                    "tokens + the distinct adapters' weights at their ranks) / bandwidth; roofline_fraction = floor / "
                    "our decode step time; tokens_per_s counts the whole run (prefill step included)",
        **ours,
        "mixed_ranks": mixed,
        "baseline": baseline,
        "ratios_vs_baseline": ratios(ours["points"], baseline),
        "twin_check": twin,
        "greedy_matches_transformers": greedy,
        "targets": targets(ours["points"], baseline, ours["loads_off_step_loop"], twin, greedy),
        "seconds": round(time.perf_counter() - _START, 1),
    }  # fmt: skip
    common.save("throughput", results, plot(results), args.out)


if __name__ == "__main__":
    main()
