"""Fleet placement on the CPU with real Ray Serve: our adapter-affinity router against Ray
Serve's default router (power of two choices, preferring replicas that report the multiplexed
model id) in the same run.

4 engine replicas of a tiny random Llama, 8 adapter GPU slots each (the pool's fast tier;
the host tier is no larger), 32 adapters whose popularity follows Zipf(1.0), a few thousand
requests from concurrent clients over HTTP. Slot hit rate = requests whose adapter was in a
slot of their replica when they arrived (the replicas' own lorafleet_adapter_hits{tier="gpu"}
counters), measured after a warm-up.

    python -m benchmarks.fleet [--requests 2400] [--concurrency 48]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.common import save
from deploy.config import RouterOptions
from deploy.testing import deploy, make_adapters, make_model, scrape, start_ray, stop_fleet, total

NUM_REPLICAS = 4
SLOTS = 8
NUM_ADAPTERS = 32
ZIPF_S = 1.0
# Each replica takes as many requests as it batches (Ray Serve's advice for max_ongoing_requests);
# more clients than the fleet's batch slots keep it saturated.
MAX_BATCH = 8
ENGINE = {"device": "cpu", "dtype": "float32", "kernel_backend": "torch", "max_loras": SLOTS,
          "max_cpu_loras": SLOTS, "max_lora_rank": 8, "max_num_seqs": MAX_BATCH, "num_kv_blocks": 256,
          "max_model_len": 128}
PROMPTS = ["The quick brown fox", "Paris is the capital of", "Adapters let many tenants", "Berlin is"]


def zipf_weights(n: int, s: float) -> list[float]:
    weights = [1.0 / (rank**s) for rank in range(1, n + 1)]
    norm = sum(weights)
    return [w / norm for w in weights]


async def drive(base_url: str, key: str, adapters: list[str], weights: list[float], num_requests: int,
                concurrency: int, seed: int) -> tuple[list[float], list[tuple[str, str]], float]:
    """Send num_requests completions from `concurrency` clients; latencies (s), (adapter, replica)
    of each request and wall time."""
    rng = random.Random(seed)
    plan = [(rng.choices(adapters, weights)[0], rng.choice(PROMPTS)) for _ in range(num_requests)]
    latencies: list[float] = []
    placed: list[tuple[str, str]] = []
    headers = {"Authorization": f"Bearer {key}"}

    async def client(session: aiohttp.ClientSession) -> None:
        while plan:
            adapter, prompt = plan.pop()
            body = {"model": adapter, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
            start = time.perf_counter()
            async with session.post(base_url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{r.status}: {await r.text()}")
            latencies.append(time.perf_counter() - start)
            placed.append((adapter, r.headers.get("x-lorafleet-replica", "")))

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return latencies, placed, time.perf_counter() - start


def slot_counts(metrics_url: str) -> dict[str, float]:
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
        "affine": total(samples, "lorafleet_routing_decisions_total", decision="affine"),
        "spilled": total(samples, "lorafleet_routing_decisions_total", decision="spilled"),
    }


def placement_summary(placed: list[tuple[str, str]], ids: list[str], counts: dict[str, float]) -> dict[str, Any]:
    """Where requests ran: each replica's share and misses, and the replicas the hottest adapters used."""
    by_replica = Counter(replica for _, replica in placed)
    short = {r: f"r{i}" for i, r in enumerate(sorted(by_replica))}
    per_adapter = {a: Counter(short[r] for b, r in placed if b == a) for a in ids[:8]}
    return {
        "requests_per_replica": {short[r]: n for r, n in sorted(by_replica.items())},
        "slot_misses_per_replica": {short[r]: counts.get("nonhit:" + r, 0.0) for r in sorted(by_replica)},
        "hottest_adapters": {a: dict(c.most_common()) for a, c in per_adapter.items()},
    }


def run_policy(root: Path, http_port: int, policy: str, adapters: dict[str, str], model_dir: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    config = {
        "model": {"path": str(model_dir), "name": "tiny-llama"},
        "adapters": {"static": adapters},
        "tenants": [{"name": "bench", "adapters": ["*"]}],
        "engine": {**ENGINE, "adapter_cache_dir": str(root / "cache")},
        "replicas": {"num_replicas": NUM_REPLICAS, "num_cpus": 0.25, "max_ongoing_requests": MAX_BATCH},
        "router": {"policy": policy, "routing_stats_period_s": 0.5, "epsilon": args.epsilon, "slack": args.slack},
    }
    fleet = deploy(root, http_port, config, ["bench"], name=f"fleet-{policy}")
    ids = sorted(adapters, key=lambda a: int(a.split("-")[1]))
    weights = zipf_weights(len(ids), ZIPF_S)
    key = fleet.keys["bench"]
    warmup = args.requests // 10
    asyncio.run(drive(fleet.base_url, key, ids, weights, warmup, args.concurrency, seed=1))
    before = slot_counts(fleet.metrics_url)
    latencies, placed, wall = asyncio.run(drive(fleet.base_url, key, ids, weights, args.requests, args.concurrency,
                                        seed=2))
    after = slot_counts(fleet.metrics_url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    arrivals = delta["gpu_hits"] + delta["host_hits"] + delta["misses"]
    from ray import serve

    serve.delete(f"fleet-{policy}")
    latencies.sort()
    return {
        "requests": len(latencies),
        "slot_hit_rate": delta["gpu_hits"] / arrivals,
        "host_hit_rate": delta["host_hits"] / arrivals,
        "miss_rate": delta["misses"] / arrivals,
        "routing_affine": delta["affine"],
        "routing_spilled": delta["spilled"],
        "throughput_rps": len(latencies) / wall,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "placement": placement_summary(placed, ids, delta),
    }


def figure(results: dict[str, Any]) -> Any:
    names = ["affinity", "default"]
    labels = ["lorafleet affinity", "Ray Serve default"]
    colors = ["tab:blue", "tab:gray"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [
        ("slot hit rate", [results[n]["slot_hit_rate"] for n in names], (0, 1.05)),
        ("throughput (req/s)", [results[n]["throughput_rps"] for n in names], None),
        ("latency p50 / p99 (ms)", None, None),
    ]
    for ax, (title, values, ylim) in zip(axes, panels, strict=True):
        ax.set_title(title)
        if values is not None:
            ax.bar(labels, values, color=colors)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
        if ylim:
            ax.set_ylim(*ylim)
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [results[n]["latency_p50_ms"] for n in names], 0.4, label="p50",
                color=colors)
    axes[2].bar([i + 0.2 for i in x], [results[n]["latency_p99_ms"] for n in names], 0.4, label="p99",
                color=colors, alpha=0.5)
    axes[2].set_xticks(list(x), labels)
    axes[2].legend()
    fig.suptitle(f"{NUM_REPLICAS} CPU replicas x {SLOTS} slots, {NUM_ADAPTERS} adapters Zipf({ZIPF_S}), "
                 f"{results['requests_per_router']} requests, {results['concurrency']} clients")
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2400)
    parser.add_argument("--concurrency", type=int, default=48)
    defaults = RouterOptions()
    parser.add_argument("--epsilon", type=float, default=defaults.epsilon, help="our router's load bound")
    parser.add_argument("--slack", type=float, default=defaults.slack, help="our router's load bound")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lf-bench-fleet") as tmp:
        root = Path(tmp)
        model_dir = make_model(root)
        adapters = make_adapters(model_dir, root / "adapters", [f"zipf-{i}" for i in range(NUM_ADAPTERS)])
        http_port = start_ray(root)
        try:
            results: dict[str, Any] = {
                "replicas": NUM_REPLICAS, "slots_per_replica": SLOTS, "adapters": NUM_ADAPTERS, "zipf_s": ZIPF_S,
                "requests_per_router": args.requests, "warmup_requests": args.requests // 10,
                "concurrency": args.concurrency, "max_tokens": 8, "device": "cpu (2 cores)",
                "epsilon": args.epsilon, "slack": args.slack,
            }
            for policy in ("affinity", "default"):
                results[policy] = run_policy(root, http_port, policy, adapters, model_dir, args)
        finally:
            stop_fleet()
    results["hit_rate_gain_points"] = 100 * (results["affinity"]["slot_hit_rate"] - results["default"]["slot_hit_rate"])
    results["target_met"] = results["affinity"]["slot_hit_rate"] >= 0.95 and results["hit_rate_gain_points"] >= 20
    save("fleet", results, figure(results))


if __name__ == "__main__":
    main()
