"""Fleet placement with real Ray Serve: our adapter-affinity router against Ray Serve's default
router (power of two choices, preferring replicas that report the multiplexed model id) in the
same run, on CPU replicas or on one GPU per replica.

Every request is a streamed chat completion (greedy, EOS ignored, a fixed number of tokens) whose
adapter follows Zipf(1.0), from concurrent clients over HTTP. The model has random weights
(load_format "dummy") and the adapters are random PEFT folders written at the start into one
local folder that the registry lists as a prefix. Each replica's host tier is no larger than its
slots, so a request whose adapter is not in a slot waits for a load from disk. Measured after a
warm-up: slot hit rate (requests whose adapter was in a slot of their replica when they arrived:
the replicas' own lorafleet_adapter_hits{tier="gpu"} counters), adapter loads per minute,
requests and generated tokens per second for the whole fleet, latency and time to first token
(the first streamed chunk: the ingress answers once the replica has the first token).

    python -m benchmarks.fleet [--requests 2400] [--concurrency 96]
        4 CPU replicas of a tiny Llama, 8 slots each, 32 rank-8 adapters: results/fleet.*
    python -m benchmarks.fleet --gpus N [--out DIR]        (scripts/device_fleet_gpu.sh)
        N replicas of one GPU each, a Llama-3-8B-shaped model in bf16, 16 slots each, 64 rank-16
        adapters on all seven projections, then one replica alone for the scaling target
        (fleet tokens/s >= 0.9 x N x one replica's, one replica driven by 1/N of the clients):
        results/fleet_gpu.*
    python -m benchmarks.fleet --gpus 0 --tiny
        the --gpus path with tiny shapes on 2 CPU replicas, the check before a device call:
        results/fleet_gpu_tiny.*
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.common import RESULTS_DIR, save, zipf_weights
from benchmarks.engine import LLAMA3_8B, TINY, write_dummy_model
from benchmarks.storage import write_peft_adapter
from deploy.config import RouterOptions
from deploy.testing import CHAT_TEMPLATE, deploy, scrape, start_ray, stop_fleet, total
from storage import BaseModelSpec

ZIPF_S = 1.0
PROMPTS = ["The quick brown fox", "Paris is the capital of", "Adapters let many tenants", "Berlin is"]


@dataclass(frozen=True)
class Setup:
    """One shape of the benchmark. Each replica takes as many requests as it batches (Ray Serve's
    advice for max_ongoing_requests). The CPU shape's 96 clients are 3x the fleet's 32 batch slots,
    a loaded fleet, where placement decides what stays resident: with 48, Ray's default router still
    finds the adapter resident in 79-85% of requests, which leaves any router 15-21 points to gain."""

    name: str  # results/<name>.json
    model: dict  # config.json of the random model
    replicas: int
    num_gpus: int  # per replica
    num_cpus: float  # per replica
    slots: int
    batch: int  # max_num_seqs
    num_adapters: int
    rank: int
    max_tokens: int
    requests: int
    concurrency: int  # clients
    client_procs: int  # client processes (one Python process cannot read a GPU fleet's streams)
    gpu_targets: bool  # issue 8's targets (TTFT p99, scaling over one replica), not issue 6's (hit-rate gain)

    def engine(self) -> dict[str, Any]:
        return {"load_format": "dummy", "max_loras": self.slots, "max_cpu_loras": self.slots,
                "max_lora_rank": self.rank, "max_num_seqs": self.batch, "max_model_len": 256,
                # Enough blocks for every sequence at max_model_len, no more (no memory-fraction sizing).
                "num_kv_blocks": self.batch * 256 // 16}


CPU = Setup("fleet", TINY, replicas=4, num_gpus=0, num_cpus=0.25, slots=8, batch=8, num_adapters=32, rank=8,
            max_tokens=8, requests=2400, concurrency=96, client_procs=1, gpu_targets=False)


def gpu_setup(gpus: int, tiny: bool) -> Setup:
    if tiny:  # the same path with tiny shapes: on CPU replicas with --gpus 0
        replicas = gpus or 2
        return Setup("fleet_gpu_tiny", TINY, replicas=replicas, num_gpus=1 if gpus else 0, num_cpus=0.25,
                     slots=2, batch=4, num_adapters=8, rank=16, max_tokens=8, requests=40,
                     concurrency=6 * replicas, client_procs=2, gpu_targets=True)
    return Setup("fleet_gpu", LLAMA3_8B, replicas=gpus, num_gpus=1, num_cpus=0.5, slots=16, batch=64,
                 num_adapters=64, rank=16, max_tokens=64, requests=3000, concurrency=96 * gpus,
                 client_procs=min(8, 2 * gpus), gpu_targets=True)


def log(message: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- artefacts --------------------------------------------------------------------------------


def make_model(config: dict, folder: Path) -> Path:
    """A random-weights model folder (config.json, tokenizer) with a chat template."""
    from transformers import AutoTokenizer

    write_dummy_model(config, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def write_adapters(model_dir: Path, folder: Path, count: int, rank: int) -> list[str]:
    """`count` random PEFT adapters on all seven projections, folder/zipf-<i>; their ids, hottest first.
    Written by threads: 64 of the 8B shape are ~5.4 GB, random numbers and writes overlap."""
    base = BaseModelSpec.from_pretrained(model_dir)
    ids = [f"zipf-{i}" for i in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: write_peft_adapter(folder / name, base, rank), ids))
    return ids


# -- clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request as its client saw it (time.monotonic(), the same clock in every process)."""

    adapter: str
    replica: str
    start: float
    first_chunk: float
    end: float
    tokens: int


async def stream_chat(session: aiohttp.ClientSession, base_url: str, key: str, adapter: str, prompt: str,
                      max_tokens: int) -> Sample:
    body = {"model": adapter, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first, tokens = 0.0, -1
    async with session.post(base_url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"{adapter}: HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            first = first or time.monotonic()
            # Only the usage chunk and an error carry these keys (quotes in text are escaped).
            if b'"usage"' in line or b'"error"' in line:
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(f"{adapter}: error in the stream: {data['error']}")
                tokens = data["usage"]["completion_tokens"]
        replica = r.headers.get("x-lorafleet-replica", "")
    if tokens < 0:
        raise RuntimeError(f"{adapter}: the stream ended without a usage chunk")
    return Sample(adapter, replica, start, first, time.monotonic(), tokens)


def run_clients(base_url: str, key: str, plan: list[tuple[str, str]], concurrency: int, max_tokens: int,
                start_at: float) -> list[Sample]:
    """`concurrency` clients in this process take requests from the plan until it is empty; they begin
    at start_at, so that several processes start together."""

    async def main() -> list[Sample]:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        todo, samples = list(plan), []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=connector) as s:

            async def client() -> None:
                while todo:
                    adapter, prompt = todo.pop()
                    samples.append(await stream_chat(s, base_url, key, adapter, prompt, max_tokens))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        return samples

    return asyncio.run(main())


def drive(clients: Executor | None, procs: int, base_url: str, key: str, plan: list[tuple[str, str]],
          concurrency: int, max_tokens: int) -> list[Sample]:
    """The plan over `procs` client processes (in this one without an executor)."""
    start_at = time.monotonic() + (1.0 if clients else 0.0)
    if clients is None:
        return run_clients(base_url, key, plan, concurrency, max_tokens, start_at)
    futures = [clients.submit(run_clients, base_url, key, plan[i::procs], math.ceil(concurrency / procs),
                              max_tokens, start_at) for i in range(procs)]
    return [s for f in futures for s in f.result()]


def make_plan(ids: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    weights = zipf_weights(len(ids), ZIPF_S)
    return [(rng.choices(ids, weights)[0], rng.choice(PROMPTS)) for _ in range(n)]


# -- one router --------------------------------------------------------------------------------


def pool_counts(metrics_url: str) -> dict[str, float]:
    samples = scrape(metrics_url)
    # Requests that found their adapter out of a slot, per replica ("nonhit:<replica id>").
    nonhits: Counter[str] = Counter()
    for (name, labels), value in samples.items():
        tier = dict(labels).get("tier")
        if name == "lorafleet_adapter_misses_total" or (name == "lorafleet_adapter_hits_total" and tier == "host"):
            nonhits["nonhit:" + dict(labels)["replica"]] += value
    return {
        **nonhits,
        "gpu_hits": total(samples, "lorafleet_adapter_hits_total", tier="gpu"),
        "host_hits": total(samples, "lorafleet_adapter_hits_total", tier="host"),
        "misses": total(samples, "lorafleet_adapter_misses_total"),
        "loads": total(samples, "lorafleet_adapter_loads_total"),
        "affine": total(samples, "lorafleet_routing_decisions_total", decision="affine"),
        "spilled": total(samples, "lorafleet_routing_decisions_total", decision="spilled"),
    }


def placement_summary(samples: list[Sample], ids: list[str], counts: dict[str, float]) -> dict[str, Any]:
    """Where requests ran: each replica's share and misses, and the replicas the hottest adapters used."""
    by_replica = Counter(s.replica for s in samples)
    short = {r: f"r{i}" for i, r in enumerate(sorted(by_replica))}
    per_adapter = {a: Counter(short[s.replica] for s in samples if s.adapter == a) for a in ids[:8]}
    return {
        "requests_per_replica": {short[r]: n for r, n in sorted(by_replica.items())},
        "slot_misses_per_replica": {short[r]: counts.get("nonhit:" + r, 0.0) for r in sorted(by_replica)},
        "hottest_adapters": {a: dict(c.most_common()) for a, c in per_adapter.items()},
    }


def percentile_ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[int(q * (len(values) - 1))]


def run_policy(root: Path, http_port: int, setup: Setup, policy: str, model_dir: Path, ids: list[str],
               clients: Executor | None, args: argparse.Namespace) -> dict[str, Any]:
    config = {
        "model": {"path": str(model_dir), "name": "random-llama"},
        "adapters": {"prefixes": [str(root / "adapters")], "static": {}},
        "tenants": [{"name": "bench", "adapters": ["*"]}],
        "engine": {**setup.engine(), "adapter_cache_dir": str(root / "cache")},
        "replicas": {"num_replicas": setup.replicas, "num_cpus": setup.num_cpus, "num_gpus": setup.num_gpus,
                     "max_ongoing_requests": setup.batch},
        "router": {"policy": policy, "routing_stats_period_s": 0.5, "epsilon": args.epsilon, "slack": args.slack},
    }
    name = f"fleet-{policy}-{setup.replicas}"
    log(f"deploying {name}")
    fleet = deploy(root, http_port, config, ["bench"], name=name)
    key, procs = fleet.keys["bench"], setup.client_procs
    warmup = setup.requests // 10
    log(f"{name}: {warmup} warm-up requests")
    drive(clients, procs, fleet.base_url, key, make_plan(ids, warmup, seed=1), setup.concurrency, setup.max_tokens)
    before = pool_counts(fleet.metrics_url)
    log(f"{name}: {setup.requests} requests from {setup.concurrency} clients in {procs} process(es)")
    samples = drive(clients, procs, fleet.base_url, key, make_plan(ids, setup.requests, seed=2),
                    setup.concurrency, setup.max_tokens)
    after = pool_counts(fleet.metrics_url)
    from ray import serve

    serve.delete(name)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    arrivals = delta["gpu_hits"] + delta["host_hits"] + delta["misses"]
    wall = max(s.end for s in samples) - min(s.start for s in samples)
    latencies, ttfts = [s.end - s.start for s in samples], [s.first_chunk - s.start for s in samples]
    result = {
        "requests": len(samples),
        "slot_hit_rate": delta["gpu_hits"] / arrivals,
        "host_hit_rate": delta["host_hits"] / arrivals,
        "miss_rate": delta["misses"] / arrivals,
        "adapter_loads_per_min": 60 * delta["loads"] / wall,
        "routing_affine": delta["affine"],
        "routing_spilled": delta["spilled"],
        "wall_s": wall,
        "throughput_rps": len(samples) / wall,
        "generated_tokens_per_s": sum(s.tokens for s in samples) / wall,
        "latency_p50_ms": percentile_ms(latencies, 0.5),
        "latency_p99_ms": percentile_ms(latencies, 0.99),
        "ttft_p50_ms": percentile_ms(ttfts, 0.5),
        "ttft_p99_ms": percentile_ms(ttfts, 0.99),
        "placement": placement_summary(samples, ids, delta),
    }
    print(json.dumps({name: result}), flush=True)  # kept in the log if a later phase runs out of time
    return result


# -- the run -----------------------------------------------------------------------------------


def device_name(setup: Setup) -> str:
    if not setup.num_gpus:
        return f"cpu ({multiprocessing.cpu_count()} cores)"
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True, check=True).stdout.split("\n")
    return f"{setup.replicas} x {gpus[0].strip()}"


def targets(results: dict[str, Any], setup: Setup) -> dict[str, bool]:
    ours, default = results["affinity"], results["default"]
    found = {"slot_hit_rate_ge_0.95": ours["slot_hit_rate"] >= 0.95}
    if not setup.gpu_targets:  # the CPU benchmark's target (issue 6)
        return {**found, "hit_rate_gain_ge_20_points": results["hit_rate_gain_points"] >= 20}
    found["ttft_p99_ge_30pct_lower"] = ours["ttft_p99_ms"] <= 0.7 * default["ttft_p99_ms"]
    if "scaling" in results:
        found["scaling_ge_0.9"] = results["scaling"] >= 0.9
    return found


def run(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "device": device_name(setup), "replicas": setup.replicas, "slots_per_replica": setup.slots,
        "host_slots_per_replica": setup.slots, "max_num_seqs": setup.batch, "adapters": setup.num_adapters,
        "adapter_rank": setup.rank, "zipf_s": ZIPF_S, "model": {k: setup.model[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
        "requests_per_router": setup.requests, "warmup_requests": setup.requests // 10,
        "concurrency": setup.concurrency, "client_processes": setup.client_procs, "max_tokens": setup.max_tokens,
        "epsilon": args.epsilon, "slack": args.slack,
    }
    with tempfile.TemporaryDirectory(prefix="lf-bench-fleet") as tmp:
        root = Path(tmp)
        model_dir = make_model(setup.model, root / "random-llama")
        log(f"writing {setup.num_adapters} rank-{setup.rank} adapters")
        start = time.perf_counter()
        ids = write_adapters(model_dir, root / "adapters", setup.num_adapters, setup.rank)
        results["adapter_write_s"] = time.perf_counter() - start
        http_port = start_ray(root)
        clients = (ProcessPoolExecutor(setup.client_procs, mp_context=multiprocessing.get_context("spawn"))
                   if setup.client_procs > 1 else None)
        try:
            for policy in ("affinity", "default"):
                results[policy] = run_policy(root, http_port, setup, policy, model_dir, ids, clients, args)
            if setup.gpu_targets and setup.replicas > 1:
                # One replica driven by 1/N of the fleet's clients and requests: its tokens/s x N is
                # what the fleet would give if N replicas did not get in each other's way.
                n = setup.replicas
                one = dataclasses.replace(setup, replicas=1, requests=setup.requests // n,
                                          concurrency=math.ceil(setup.concurrency / n),
                                          client_procs=max(1, setup.client_procs // n))
                results["one_replica"] = run_policy(root, http_port, one, "affinity", model_dir, ids,
                                                    clients, args)
                results["scaling"] = results["affinity"]["generated_tokens_per_s"] / (
                    setup.replicas * results["one_replica"]["generated_tokens_per_s"])
        finally:
            if clients is not None:
                clients.shutdown()
            stop_fleet()
    results["hit_rate_gain_points"] = 100 * (results["affinity"]["slot_hit_rate"] - results["default"]["slot_hit_rate"])
    results["ttft_p99_reduction"] = 1 - results["affinity"]["ttft_p99_ms"] / results["default"]["ttft_p99_ms"]
    results["targets"] = targets(results, setup)
    results["target_met"] = all(results["targets"].values())
    return results


def figure(results: dict[str, Any]) -> Any:
    names = ["affinity", "default"]
    labels = ["lorafleet affinity", "Ray Serve default"]
    colors = ["tab:blue", "tab:gray"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))

    def bars(ax: Any, title: str, values: list[float], bar_labels: list[str], bar_colors: list[str]) -> None:
        ax.set_title(title)
        ax.bar(bar_labels, values, color=bar_colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
        ax.tick_params(axis="x", labelsize=8)

    bars(axes[0], "slot hit rate", [results[n]["slot_hit_rate"] for n in names], labels, colors)
    axes[0].set_ylim(0, 1.05)
    tokens = [results[n]["generated_tokens_per_s"] for n in names]
    if "one_replica" in results:
        tokens.append(results["replicas"] * results["one_replica"]["generated_tokens_per_s"])
    bars(axes[1], "generated tokens/s (fleet)", tokens,
         [*labels, f"{results['replicas']} x one replica"][: len(tokens)], [*colors, "tab:green"][: len(tokens)])
    bars(axes[2], "adapter loads per minute", [results[n]["adapter_loads_per_min"] for n in names], labels, colors)
    x = range(len(names))
    axes[3].set_title("time to first token p50 / p99 (ms)")
    axes[3].bar([i - 0.2 for i in x], [results[n]["ttft_p50_ms"] for n in names], 0.4, label="p50", color=colors)
    axes[3].bar([i + 0.2 for i in x], [results[n]["ttft_p99_ms"] for n in names], 0.4, label="p99",
                color=colors, alpha=0.5)
    axes[3].set_xticks(list(x), labels, fontsize=8)
    axes[3].legend()
    fig.suptitle(f"{results['device']}: {results['replicas']} replicas x {results['slots_per_replica']} slots, "
                 f"{results['adapters']} rank-{results['adapter_rank']} adapters Zipf({ZIPF_S}), "
                 f"{results['requests_per_router']} streamed chat requests, {results['concurrency']} clients")
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="N replicas of one GPU each (0 with --tiny: CPU)")
    parser.add_argument("--tiny", action="store_true", help="the --gpus path with tiny shapes")
    parser.add_argument("--requests", type=int, default=None, help="per router (default: the setup's)")
    parser.add_argument("--concurrency", type=int, default=None, help="clients (default: the setup's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for <name>.json and .png")
    defaults = RouterOptions()
    parser.add_argument("--epsilon", type=float, default=defaults.epsilon, help="our router's load bound")
    parser.add_argument("--slack", type=float, default=defaults.slack, help="our router's load bound")
    args = parser.parse_args()
    if (args.tiny and args.gpus is None) or (args.gpus == 0 and not args.tiny):
        parser.error("--tiny goes with --gpus N (N = 0: CPU replicas), and --gpus 0 needs --tiny")
    if args.gpus is not None and args.gpus < 0:
        parser.error("--gpus must be >= 0")
    setup = CPU if args.gpus is None else gpu_setup(args.gpus, args.tiny)
    overrides = {k: getattr(args, k) for k in ("requests", "concurrency") if getattr(args, k) is not None}
    setup = dataclasses.replace(setup, **overrides)
    results = run(setup, args)
    save(setup.name, results, figure(results), args.out)


if __name__ == "__main__":
    main()
