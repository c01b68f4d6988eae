"""LoRA kernel benchmark: python -m benchmarks.kernels [--out DIR] [--auto-table PATH]

On a GPU: every backend is first checked against the torch reference in bf16 on fresh random inputs,
then timed as CUDA-graph replays with a cold L2 (loop and gather_bmm sync with the host, so they run
eagerly) over the grid of issue 3: decode (one token per request) and prefill (segments of 16 to 512
tokens), hidden 4096, out 4096 and 14336, rank 16 and 64, 1/8/32/every-row-distinct adapters, and
decode batches whose rows follow Zipf(1.5) over the adapters ("skewed": auto's choice for a shape is the
backend whose worst case over its even and skewed points is best). Beside each point: the base GEMM x @ W and the roofline (fewest bytes over measured HBM bandwidth). Also one
Llama-3-8B layer's seven projections (merged q/k/v and gate/up). Writes <out>/kernels.json and .png;
--auto-table writes the measured-fastest backend per shape, the table backend="auto" reads.
On the CPU it runs a small smoke grid (interpreter; host timers) to exercise the same code."""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

import kernels
from benchmarks import common
from kernels import LoRAMeta, add_lora_slices, auto, cuda, triton_bgmv, triton_sgmv

SPLIT = {"triton_sgmv": triton_sgmv, "triton_bgmv": triton_bgmv, "cuda": cuda}  # each has shrink and expand
OPTIMISED = (*SPLIT, "triton_sgmv_pdl")  # the same two kernels as triton_sgmv, overlapped: timed together
BASELINES = ("loop", "gather_bmm")
ROUNDS = 2  # timings of each backend at each point, the fastest kept (measure_point)
SKEW = 1.5  # Zipf exponent of the skewed decode points (the Punica paper's skewed workload)
CHECK_TOL = 2e-2  # relative to the size of the LoRA delta; bf16 operands land near 1e-3..1e-2
HIDDEN = 4096
LLAMA3_8B = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
             "down": (14336, (4096,))}


class Problem:
    """One point: x, y, stacks of adapters, and which rows use which slot."""

    def __init__(self, mode: str, t: int, adapters: int, d_in: int, outs: tuple[int, ...], rank: int,
                 dtype: torch.dtype, device: str, seed: int) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.mode, self.t, self.adapters, self.rank, self.outs, self.d_in = mode, t, adapters, rank, outs, d_in

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.x = randn(t, d_in)
        self.y0 = randn(t, sum(outs))
        self.lora_a = [randn(adapters, rank, d_in, scale=d_in**-0.5) for _ in outs]
        self.lora_b = [randn(adapters, o, rank, scale=rank**-0.5) for o in outs]
        self.scalings = (torch.rand(adapters, generator=g) + 0.5).to(device)
        if mode in ("decode", "skewed"):  # every adapter present, rows in random order
            # skewed: the other rows' adapters drawn by Zipf popularity, as in serving traffic: a few long
            # segments and many short ones (a decode graph's kernels must serve any such batch)
            weights = torch.tensor(common.zipf_weights(adapters, SKEW) if mode == "skewed" else [1.0] * adapters)
            rest = (torch.multinomial(weights, t - adapters, replacement=True, generator=g) if t > adapters
                    else torch.empty(0, dtype=torch.long))
            slots = torch.cat([torch.arange(adapters), rest])
            slots = slots[torch.randperm(t, generator=g)]
        else:  # requests' tokens are contiguous; request i uses adapter i % adapters
            requests = max(adapters, t // 512)
            slots = torch.arange(requests).repeat_interleave(t // requests) % adapters
        self.slot_ids = slots.to(device=device, dtype=torch.int32)
        self.meta = LoRAMeta.build(self.slot_ids, adapters)
        self.used = int(torch.unique(slots).numel())

    def run(self, y: torch.Tensor, backend: str) -> None:
        add_lora_slices(y, self.x, self.lora_a, self.lora_b, self.slot_ids, self.scalings, meta=self.meta,
                        backend=backend)

    def min_bytes(self) -> tuple[float, float]:
        """(shrink, expand): each input read once, each output written once."""
        e = self.x.element_size()
        shrink = e * (self.t * self.d_in + len(self.outs) * self.used * self.rank * self.d_in)
        expand = e * sum(self.used * o * self.rank + 2 * self.t * o for o in self.outs)
        return shrink, expand


def check(p: Problem, backend: str) -> float:
    """Relative error against the torch reference, over the size of the LoRA delta."""
    want, got = p.y0.clone(), p.y0.clone()
    p.run(want, "torch")
    p.run(got, backend)
    return relative_error(got, want, p.y0)


def relative_error(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor) -> float:
    """|got - want| over the size of the LoRA delta, want - before."""
    delta = (want.float() - before.float()).norm().item()
    return (got.float() - want.float()).norm().item() / max(delta, 1e-30)


def time_backend(p: Problem, backend: str, timer: Callable, eager: Callable) -> dict[str, float]:
    y = p.y0.clone()
    if backend in BASELINES:
        return {"total_us": eager(lambda: p.run(y, backend))}
    out = {"total_us": timer(lambda: p.run(y, backend))}
    if backend in SPLIT:
        m, args = SPLIT[backend], (p.lora_a, p.lora_b, p.slot_ids)
        buf = m.shrink(p.x, *args, None, p.meta, offsets(p.outs))
        out["shrink_us"] = timer(lambda: m.shrink(p.x, *args, None, p.meta, offsets(p.outs)))
        out["expand_us"] = timer(lambda: m.expand(y, buf, *args, p.scalings, None, p.meta, offsets(p.outs)))
    return out


def keep_fastest(times: dict[str, dict[str, float]], backend: str, new: dict[str, float]) -> None:
    """times[backend] becomes the faster of it and new, figure by figure."""
    old = times.get(backend, new)
    times[backend] = {k: min(v, old[k]) for k, v in new.items()}


def offsets(outs: tuple[int, ...]) -> list[int]:
    return [sum(outs[:i]) for i in range(len(outs))]


def grid(on_gpu: bool) -> list[tuple[str, int, int, int, int]]:
    """(mode, T, adapters, out, rank) points."""
    if not on_gpu:
        return [("decode", 8, 4, 64, 16), ("skewed", 16, 4, 64, 16), ("decode", 16, 16, 96, 8),
                ("prefill", 64, 2, 64, 16)]
    points = []
    for out in (4096, 14336):
        for rank in (16, 64):
            for t in (1, 16, 64, 128, 256, 1024):
                for n in sorted({min(a, t) for a in (1, 8, 32)} | {t} | ({t // 2} if t == 128 else set())):
                    points.append(("decode", t, n, out, rank))
                    if 1 < n < t and t in (64, 128, 256):
                        points.append(("skewed", t, n, out, rank))
            for t in (512, 1024, 4096):
                for n in (1, 8, 32, 128):
                    if t // max(n, t // 512) >= 16:  # segments of 16 to 512 tokens
                        points.append(("prefill", t, n, out, rank))
    return points


def layer_benchmark(timer: Callable, eager: Callable, backends: tuple[str, ...], device: str, t: int,
                    adapters: int, rank: int, scale: int) -> dict:
    """All seven projections of one Llama-3-8B layer (merged q/k/v and gate/up): LoRA vs base GEMMs."""
    problems = {name: Problem("decode", t, adapters, d_in // scale, tuple(o // scale for o in outs), rank,
                              torch.bfloat16 if device == "cuda" else torch.float32, device, seed=i)
                for i, (name, (d_in, outs)) in enumerate(LLAMA3_8B.items())}
    # Scaled like a trained layer's (outputs of the size of the inputs), so that the bf16 rounding of the
    # GEMM's output does not swamp the LoRA delta in linear_lora's check.
    # [out, in] like the model's, and its base GEMM: kernels.linear (on a GPU, the Triton decode GEMM).
    weights = {n: torch.randn(sum(p.outs), p.d_in, device=device, dtype=p.x.dtype) * p.d_in**-0.5
               for n, p in problems.items()}
    ys = {n: p.y0.clone() for n, p in problems.items()}
    base_us = timer(lambda: [kernels.linear(p.x, weights[n]) for n, p in problems.items()])
    result = {"t": t, "adapters": adapters, "rank": rank, "base_gemm_us": base_us, "lora_us": {}}
    for b in backends:
        run_all = lambda b=b: [p.run(ys[n], b) for n, p in problems.items()]  # noqa: E731
        us = eager(run_all) if b in BASELINES else timer(run_all)
        result["lora_us"][b] = us
    result["lora_over_base"] = {b: us / base_us for b, us in result["lora_us"].items()}
    # As the model runs them: linear_lora, the base GEMM and the LoRA delta in one call (a two-launch
    # backend's shrink overlapped with the GEMM). The add-on is what the layer takes on top of its GEMMs.
    result["linear_lora_us"], result["linear_lora_error"] = {}, {}
    for b in (b for b in backends if b not in BASELINES):
        def linear_all(b: str = b) -> list[torch.Tensor]:
            return [kernels.linear_lora(p.x, weights[n], p.lora_a, p.lora_b, p.slot_ids, p.scalings,
                                        meta=p.meta, backend=b) for n, p in problems.items()]

        errors = []
        for (n, p), got in zip(problems.items(), linear_all(), strict=True):
            want = kernels.linear(p.x, weights[n])
            base = want.clone()
            p.run(want, "torch")
            errors.append(relative_error(got, want, base))
        result["linear_lora_error"][b] = max(errors)
        result["linear_lora_us"][b] = timer(linear_all)
    result["addon_over_base"] = {b: us / base_us - 1 for b, us in result["linear_lora_us"].items()}
    return result


def derive_auto_table(points: list[dict]) -> list[dict]:
    """Per shape (T, slots, out, rank): the backend whose worst slowdown against the fastest, over the
    points of that shape, is smallest."""
    by_key: dict[tuple, list[dict]] = {}
    for p in points:
        by_key.setdefault((p["t"], p["adapters"], p["out"], p["rank"]), []).append(p)
    table = []
    for (t, slots, out, rank), ps in sorted(by_key.items()):
        candidates = [b for b in (*OPTIMISED, *BASELINES) if all(b in p["time"] for p in ps)]

        def worst(b: str, ps: list[dict] = ps) -> float:
            return max(p["time"][b]["total_us"] / min(v["total_us"] for k, v in p["time"].items() if k != "auto")
                       for p in ps)

        table.append({"t": t, "slots": slots, "out": out, "rank": rank, "backend": min(candidates, key=worst)})
    return table


def plot(results: dict) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("decode", 8), ("skewed", 8), ("decode", "distinct"), ("prefill", 8), ("prefill", 32)]
    shapes = sorted({(p["out"], p["rank"]) for p in results["points"]})
    fig, axes = plt.subplots(len(rows) + 1, len(shapes), figsize=(4.2 * len(shapes), 3.6 * (len(rows) + 1)),
                             squeeze=False, layout="constrained")
    for i, (mode, n) in enumerate(rows):
        for j, (out, rank) in enumerate(shapes):
            ax = axes[i][j]
            pts = sorted((p for p in results["points"] if p["mode"] == mode and p["out"] == out
                          and p["rank"] == rank and (p["adapters"] == p["t"] if n == "distinct"
                                                     else p["adapters"] == n)), key=lambda p: p["t"])
            if not pts:
                ax.set_visible(False)
                continue
            ts = [p["t"] for p in pts]
            for b in pts[0]["time"]:
                ax.plot(ts, [p["time"][b]["total_us"] for p in pts], marker="o", ms=3, label=b)
            ax.plot(ts, [p["base_gemm_us"] for p in pts], "k--", label="base GEMM x@W")
            ax.plot(ts, [p["roofline_us"] for p in pts], "k:", label="roofline")
            ax.set(xscale="log", yscale="log", xlabel="T (rows)", ylabel="us")
            ax.set_title(f"{mode}, {n} adapters, out {out}, r {rank}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    layer = results["layer"]
    ax = axes[-1][0]
    names = list(layer["lora_us"])
    ax.bar(names, [layer["lora_us"][b] for b in names], label="LoRA alone")
    overlapped = [b for b in names if b in layer["addon_over_base"]]
    ax.bar(overlapped, [max(layer["addon_over_base"][b], 1e-3) * layer["base_gemm_us"] for b in overlapped],
           width=0.4, label="add-on to the GEMMs (linear_lora)")
    ax.axhline(layer["base_gemm_us"], color="k", ls="--", label="base GEMMs")
    ax.axhline(0.2 * layer["base_gemm_us"], color="r", ls=":", label="20% target")
    ax.set(ylabel="us", yscale="log", title=f"Llama-3-8B layer, T={layer['t']}, {layer['adapters']} adapters")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7)
    for ax in axes[-1][1:]:
        ax.set_visible(False)
    fig.suptitle(f"LoRA add-on latency ({results['device']}, {results['dtype']})")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--auto-table", type=Path, default=None)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    backends = (*BASELINES, *OPTIMISED) if on_gpu else (*BASELINES, "triton_sgmv", "triton_bgmv",
                                                                  "triton_sgmv_pdl")
    broken: dict[str, str] = {}
    if on_gpu:
        t0 = time.time()
        try:
            cuda.extension()
        except Exception as e:
            broken["cuda"] = f"build: {e!r}"
        print(f"cuda extension: {broken.get('cuda', 'ready')} after {time.time() - t0:.0f} s", flush=True)
        timer, eager = common.cuda_graph_time_us, common.eager_time_us
        bandwidth = common.hbm_bandwidth_bytes_per_s()
        name = torch.cuda.get_device_name()
    else:
        timer = eager = _host_time_us
        bandwidth, name = float("nan"), "cpu (Triton interpreter)"
    timed = backends
    results: dict = {"device": name, "dtype": str(dtype).removeprefix("torch."), "hbm_bytes_per_s": bandwidth,
                     "hidden": HIDDEN, "points": []}
    gemm_cache: dict[tuple[int, int], float] = {}
    # A run stopped by `timeout` (SIGTERM) keeps the points measured so far and still writes its results.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for i, spec in enumerate(grid(on_gpu)):
            results["points"].append(measure_point(i, *spec, device, dtype, timed, broken, timer, eager,
                                                   bandwidth, gemm_cache, results["points"]))
    except KeyboardInterrupt:
        results["partial"] = True
        print("interrupted: writing the points measured so far", flush=True)

    scale = 1 if on_gpu else 64
    working = (*(b for b in timed if b not in broken), *(("auto",) if on_gpu else ()))
    if on_gpu:
        auto.use_table(derive_auto_table(results["points"]))
    results["layer"] = layer_benchmark(timer, eager, working, device, 64 if on_gpu else 8, 8, 16, scale)
    results["broken"] = broken
    results["failed_checks"] = [(p["mode"], p["t"], p["adapters"], p["out"], p["rank"], b, e)
                                for p in results["points"] for b, e in p["rel_error"].items() if not e < CHECK_TOL]
    results["failed_checks"] += [("layer linear_lora", b, e) for b, e in results["layer"]["linear_lora_error"].items()
                                 if not e < CHECK_TOL]
    try:
        if on_gpu:  # what reading the target points' bytes alone takes here
            results["read_floor_us"] = {
                name: common.read_floor_us(point(results, *key)["roofline_us"] * 1e-6 * bandwidth, timer)
                for name, (key, _) in TARGET_POINTS.items()}
        results["targets"] = targets(results) if on_gpu else {}
    except (StopIteration, KeyError, ValueError) as e:  # a partial run lacks some target points
        results["targets"] = {"error": repr(e)}
    if args.auto_table:
        args.auto_table.parent.mkdir(parents=True, exist_ok=True)
        args.auto_table.write_text(json.dumps(derive_auto_table(results["points"]), indent=0))
    common.save("kernels", results, plot(results), args.out)
    print(json.dumps({"targets": results["targets"], "layer": results["layer"], "broken": broken,
                      "failed_checks": results["failed_checks"]}, indent=1))


def measure_point(i: int, mode: str, t: int, n: int, out: int, rank: int, device: str, dtype: torch.dtype,
                  timed: tuple[str, ...], broken: dict[str, str], timer: Callable, eager: Callable,
                  bandwidth: float, gemm_cache: dict, done: list[dict]) -> dict:
    on_gpu = device == "cuda"
    d_in = HIDDEN if on_gpu else 48
    p = Problem(mode, t, n, d_in, (out,), rank, dtype, device, seed=i)
    errors: dict[str, float] = {}
    times: dict[str, dict[str, float]] = {}
    # Every backend is timed in each of ROUNDS rounds and keeps its fastest: a replay slowed for a moment
    # (seen on H100s: one backend's median 27% over the same kernels timed under another name) then
    # costs a backend nothing, whichever it hits.
    for _ in range(ROUNDS if on_gpu else 1):
        for b in timed:
            if b in broken:
                continue
            try:
                if b not in errors:
                    errors[b] = check(p, b)
                keep_fastest(times, b, time_backend(p, b, timer, eager))
            except Exception as e:  # one broken backend must not cost the whole run's other numbers
                broken[b] = f"{mode} T={t} n={n} out={out} r={rank}: {e!r}"
                print(f"BROKEN {b}: {broken[b]}", flush=True)
                errors.pop(b, None)
                times.pop(b, None)
        if on_gpu:  # auto, with the table derived from every point measured so far (this one included)
            auto.use_table(derive_auto_table([*done, {"t": t, "adapters": n, "out": out, "rank": rank, "time": times}]))
            if "auto" not in errors:
                errors["auto"] = check(p, "auto")
            keep_fastest(times, "auto", time_backend(p, "auto", timer, eager))
    if (t, out) not in gemm_cache:
        w = torch.randn(d_in, out, device=device, dtype=dtype)
        gemm_cache[(t, out)] = timer(lambda p=p, w=w: p.x @ w)
    shrink_b, expand_b = p.min_bytes()
    point = {"mode": mode, "t": t, "adapters": n, "used": p.used, "out": out, "rank": rank,
             "rel_error": errors, "time": times, "base_gemm_us": gemm_cache[(t, out)],
             "roofline_us": (shrink_b + expand_b) / bandwidth * 1e6,
             "roofline_shrink_us": shrink_b / bandwidth * 1e6, "roofline_expand_us": expand_b / bandwidth * 1e6}
    print(f"{mode:7s} T={t:5d} n={n:5d} out={out:5d} r={rank:2d} gemm {gemm_cache[(t, out)]:7.1f} "
          f"roof {point['roofline_us']:6.1f} | " + " ".join(f"{b} {v['total_us']:.1f}" for b, v in times.items())
          + f" | max err {max(errors.values(), default=0):.1e}", flush=True)
    return point


# Issue 3's latency targets: (mode, T, adapters, out, rank), microseconds.
TARGET_POINTS = {"decode r16 T64 8 adapters (<=9us)": (("decode", 64, 8, 4096, 16), 9.0),
                 "decode r16 T64 32 adapters (<=17us)": (("decode", 64, 32, 4096, 16), 17.0),
                 "decode r64 T64 64 adapters (<=25us)": (("decode", 64, 64, 4096, 64), 25.0),
                 "prefill r16 T4096 128 adapters (<=150us)": (("prefill", 4096, 128, 4096, 16), 150.0)}


def point(results: dict, mode: str, t: int, n: int, out: int, rank: int) -> dict:
    return next(p for p in results["points"] if (p["mode"], p["t"], p["adapters"], p["out"], p["rank"])
                == (mode, t, n, out, rank))


def targets(results: dict) -> dict:
    def best(p: dict) -> tuple[str, float]:
        b = min((k for k in p["time"] if k not in BASELINES), key=lambda k: p["time"][k]["total_us"])
        return b, p["time"][b]["total_us"]

    out = {}
    for name, (key, goal) in TARGET_POINTS.items():
        p = point(results, *key)
        out[name] = {"best": best(p)[0], "us": best(p)[1], "target_us": goal, "met": best(p)[1] <= goal,
                     "read_floor_us": results.get("read_floor_us", {}).get(name)}
    p8 = point(results, "prefill", 4096, 8, 4096, 16)
    out["prefill r16 T4096 8 adapters (<=2x roofline)"] = {
        "best": best(p8)[0], "us": best(p8)[1], "roofline_us": p8["roofline_us"],
        "met": best(p8)[1] <= 2 * p8["roofline_us"]}
    layer = results["layer"]
    b = min(layer["addon_over_base"], key=layer["addon_over_base"].get)
    alone = min((k for k in layer["lora_us"] if k not in BASELINES), key=lambda k: layer["lora_us"][k])
    out["Llama-3-8B layer T64 8 adapters (<=20% of base)"] = {
        "best": b, "ratio": layer["addon_over_base"][b], "met": layer["addon_over_base"][b] <= 0.2,
        "lora_alone_best": alone, "lora_alone_ratio": layer["lora_over_base"][alone]}
    slower = [(p["mode"], p["t"], p["adapters"], p["out"], p["rank"], k)
              for p in results["points"] for k in OPTIMISED
              if k in p["time"] and p["time"][k]["total_us"] > min(p["time"][b]["total_us"] for b in BASELINES
                                                                 if b in p["time"])]
    out["triton and cuda never slower than loop/gather_bmm"] = {"violations": slower, "met": not slower}
    auto_bad = [(p["mode"], p["t"], p["adapters"], p["out"], p["rank"],
                 p["time"]["auto"]["total_us"] / min(v["total_us"] for k, v in p["time"].items() if k != "auto"))
                for p in results["points"] if "auto" in p["time"]]
    auto_bad = [a for a in auto_bad if a[-1] > 1.1]
    out["auto within 10% of best"] = {"violations": auto_bad, "met": not auto_bad}
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _host_time_us(fn: Callable, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
