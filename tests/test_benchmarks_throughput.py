"""benchmarks.throughput: the workloads' adapter assignment, and the whole --tiny run end to end
(the same code the GPU run takes, small shapes on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.throughput import BASELINE_BATCHES, BASELINE_WORKLOADS, BATCHES, WORKLOADS, workload_adapters

ROOT = Path(__file__).resolve().parents[1]


def test_workloads_assign_adapters_as_in_punica() -> None:
    assert workload_adapters("base_only", 8) == [None] * 8
    assert len(set(workload_adapters("identical", 64))) == 1
    uniform = workload_adapters("uniform", 64)
    assert len(set(uniform)) == 8  # sqrt(64)
    assert set(Counter(uniform).values()) == {8}  # equally popular
    assert uniform[:9] == [*uniform[:8], uniform[0]]  # round-robin
    assert len(set(workload_adapters("uniform", 32))) == 6  # round(sqrt(32))
    assert len(set(workload_adapters("distinct", 128))) == 128
    skewed = workload_adapters("skewed", 128)
    assert skewed == workload_adapters("skewed", 128)  # a fixed seed
    counts = Counter(a.name for a in skewed)
    assert counts.most_common(1)[0][0] == "tenant0" and 1 < len(counts) < 64  # Zipf: a head and a tail


def test_tiny_run_writes_every_point(tmp_path: Path) -> None:
    # One intra-op thread: on a few shared cores, OpenMP teams of tiny ops wait on descheduled
    # threads, and a run of seconds takes minutes.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert results["batches"] == list(BATCHES)
    for workload in WORKLOADS:
        points = results["points"][workload]
        assert [p["batch"] for p in points] == list(BATCHES)
        for p in points:
            assert p["tokens_per_s"] > 0 and p["decode_step_ms"] > 0 and p["ttft_ms"] >= 0
            assert p["roofline_step_ms"] > 0 and p["roofline_fraction"] > 0
            assert p["run"]["generated_tokens"] == p["batch"] * results["gen_len"]
    assert [p["num_adapters"] for p in results["points"]["distinct"]] == list(BATCHES)
    for workload in BASELINE_WORKLOADS:
        assert [p["batch"] for p in results["baseline"]["points"][workload]] == list(BASELINE_BATCHES)
        assert all(p["tokens_per_s"] > 0 for p in results["baseline"]["points"][workload])
    assert len(results["ratios_vs_baseline"]) == len(BASELINE_WORKLOADS) * len(BASELINE_BATCHES)
    sampled = results["sampled"]
    assert sampled["batch"] == 64 and sampled["tokens_per_s"] > 0 and sampled["over_greedy"] > 0
    mixed = results["mixed_ranks"]
    assert mixed["tokens_per_s"] > 0 and sorted(set(mixed["adapter_ranks"])) == [8, 16, 64]
    loads = results["loads_off_step_loop"]
    assert loads["median_alone_ms"] > 0 and loads["median_during_loads_ms"] > 0
    assert loads["free_kv_blocks_after"] == loads["total_kv_blocks"]  # every request's blocks came back
    assert results["targets"]["twin_check_same_tokens"]["met"] is True, results["twin_check"]
    assert results["targets"]["greedy_matches_transformers"]["met"] is True
    assert all(isinstance(t["met"], bool) for t in results["targets"].values())

    (tmp_path / "throughput.png").unlink()
    redraw = [sys.executable, "-m", "benchmarks.throughput", "--plot-only", "--out", str(tmp_path)]
    subprocess.run(redraw, cwd=ROOT, check=True, timeout=120)
    assert (tmp_path / "throughput.png").stat().st_size > 0
