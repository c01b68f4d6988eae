"""Small helpers shared by the benchmarks: CUDA-graph timing with a cold L2, the floor of reading bytes, JSON +
PNG output."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from kernels import launch

RESULTS_DIR = Path(__file__).parent / "results"


def cuda_graph_time_us(fn: Callable[[], Any], *, reps: int = 30, cold_l2: bool = True) -> float:
    """Median time of one replay of a CUDA graph of fn(), in microseconds. Each replay is timed on its
    own with device events; with cold_l2 a buffer larger than the L2 is read before each, as in serving,
    where every layer's weights arrive from HBM."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph: compiles kernels, fills caches of metadata
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time_replays(graph.replay, reps, cold_l2)


def eager_time_us(fn: Callable[[], Any], *, reps: int = 10, cold_l2: bool = True) -> float:
    """Like cuda_graph_time_us for code that cannot be captured (host syncs): launch gaps included."""
    fn()
    return _time_replays(fn, reps, cold_l2)


# Read, not overwritten, to empty the L2: overwriting leaves it full of dirty lines whose write-back the
# timed kernel then pays for (H100: reading 67 MB took 35.1 us after an overwrite, 26.9 after a read; a T=64
# 4096x4096 GEMM 21.1 and 16.7 us), while in serving the L2 holds the previous kernel's weights, clean.
_flush: torch.Tensor | None = None


def _time_replays(run: Callable[[], Any], reps: int, cold_l2: bool) -> float:
    global _flush
    if cold_l2 and _flush is None:
        _flush = torch.zeros(64 * 2**20, dtype=torch.float32, device="cuda")  # 256 MB, 5x the largest L2
    times = []
    for _ in range(reps):
        if cold_l2:
            _flush.sum()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def hbm_bandwidth_bytes_per_s(device: str = "cuda") -> float:
    """Measured: a large copy on the device (2 GiB on CUDA, the median of 10 timed with events;
    64 MiB on the CPU, the best of 5 by the wall clock), bytes read plus bytes written over the time."""
    src = torch.empty(2**31 if device == "cuda" else 2**26, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        us = eager_time_us(lambda: dst.copy_(src), reps=10, cold_l2=False)
    else:
        us = min(_wall_time_us(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() / (us * 1e-6)


def read_floor_us(nbytes: float, timer: Callable[[Callable[[], Any]], float] = cuda_graph_time_us) -> float:
    """The time of one kernel that only reads nbytes (16-byte loads, four programs per SM, pipelined), timed
    with `timer`: what moving those bytes costs in the same harness, launch and ramp included. A roofline
    from the copy bandwidth leaves both out."""
    programs = launch.num_programs_target(torch.device("cuda"), per_sm=4)
    block = 4096
    per_program = triton.cdiv(triton.cdiv(int(nbytes) // 2, programs), block) * block
    src = torch.zeros(programs * per_program, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty(programs, dtype=torch.float32, device="cuda")
    return timer(lambda: _stream_read_kernel[(programs,)](src, dst, per_program, BLOCK=block, num_warps=4))


@triton.jit
def _stream_read_kernel(src, dst, per_program, BLOCK: tl.constexpr):
    base = src + tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, per_program, BLOCK, num_stages=4):
        acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(dst + tl.program_id(0), tl.sum(acc))


def _wall_time_us(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def save(name: str, results: dict, figure: Any, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Writes <out_dir>/<name>.json and <name>.png and prints the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    text = json.dumps(results, indent=1)
    json_path.write_text(text)
    figure.savefig(png_path, dpi=110, bbox_inches="tight")
    print(text)
    return json_path, png_path


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of ranks 1..n under Zipf(s), normalised."""
    weights = [1.0 / (rank**s) for rank in range(1, n + 1)]
    norm = sum(weights)
    return [w / norm for w in weights]
