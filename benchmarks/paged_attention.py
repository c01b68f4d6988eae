"""Paged decode-attention benchmark: python -m benchmarks.paged_attention [--out DIR]

On a GPU (Llama-3-8B attention shapes: 32 query heads, 8 kv heads, head dim 128, block size 16, bf16):
every point is first checked against the torch reference, then timed as CUDA-graph replays with a cold
L2: the Triton kernel and, beside it, what decode did before (gather every sequence's keys into a padded
tensor, SDPA with a mask). Short contexts (150-250 keys) at batch 1..128, long ones (4096) at batch
1..8; block tables as wide as a 4096-token context (as a CUDA graph holds them) with shuffled block ids.
The roofline is the fewest bytes (each sequence's keys and values once, q and the output) over the
measured HBM bandwidth. A small sweep of launch configurations at two points shows what the defaults
give up. On the CPU it runs a tiny grid in the interpreter (host timers) to exercise the same code."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import common
from kernels.paged_attention import attention_triton, block_n, num_splits, paged_decode_attention

MAX_CONTEXT = 4096
CHECK_TOL = 2e-2  # relative error in bf16


class Problem:
    """One batch: a paged cache holding each sequence's keys in shuffled blocks, and one query each."""

    def __init__(self, context_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        batch = len(context_lens)
        needed = [-(-n // block_size) for n in context_lens]
        max_blocks = -(-MAX_CONTEXT // block_size)
        num_blocks = sum(needed) + 8
        ids = torch.randperm(num_blocks, generator=g)
        tables = torch.zeros(batch, max_blocks, dtype=torch.int32)
        start = 0
        for b, n in enumerate(needed):
            tables[b, :n] = ids[start:start + n].int()
            start += n
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        self.block_tables = tables.to(device)
        self.k_cache = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        self.v_cache = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=g).to(device=device, dtype=dtype)
        self.q = qkv[:, :heads * head_dim].view(batch, heads, head_dim)  # as the model's fused qkv gives it
        self.out = torch.empty(self.q.shape, dtype=dtype, device=device)
        self.block_size, self.scale = block_size, head_dim**-0.5
        self.min_bytes = (sum(context_lens) * 2 * kv_heads * head_dim + 2 * self.q.numel()) * dtype.itemsize

    def args(self) -> tuple:
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens

    def triton(self, **config) -> None:
        attention_triton(*self.args(), self.block_size, self.scale, self.out, **config)

    def reference(self) -> torch.Tensor:
        return paged_decode_attention(*self.args(), block_size=self.block_size, scale=self.scale, backend="torch")

    def gather_sdpa(self) -> Callable[[], torch.Tensor]:
        """The path decode took before: pad every sequence to the longest (whole blocks), gather, SDPA."""
        bs = self.block_size
        max_kv = -(-int(self.context_lens.max()) // bs) * bs
        pos = torch.arange(max_kv, device=self.q.device)
        kv_slots = self.block_tables[:, pos // bs].long() * bs + pos % bs
        mask = (pos[None, :] < self.context_lens[:, None].long())[:, None, None, :]  # [B, 1, 1, max_kv]
        query = self.q[:, :, None, :]  # [B, Hq, 1, D]

        def run() -> torch.Tensor:
            keys = self.k_cache[kv_slots].transpose(1, 2)  # [B, Hkv, max_kv, D]
            values = self.v_cache[kv_slots].transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)[:, :, 0]

        return run


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def time_us(fn: Callable[[], object], on_gpu: bool) -> float:
    if on_gpu:
        return common.cuda_graph_time_us(fn)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def run_point(p: Problem, on_gpu: bool, bandwidth: float | None) -> dict:
    want = p.reference()
    p.out.fill_(float("nan"))  # poison: every element must be written
    p.triton()
    err = rel_error(p.out, want)
    base = p.gather_sdpa()
    base_err = rel_error(base(), want)
    if not (err < CHECK_TOL and base_err < CHECK_TOL):
        raise AssertionError(f"mismatch against the reference: triton {err:.2e}, gather+sdpa {base_err:.2e}")
    batch, _, head_dim = p.q.shape
    point = dict(batch=batch, mean_context=float(p.context_lens.float().mean()), rel_error=err,
                 splits=num_splits(batch, p.k_cache.shape[1], p.block_tables.shape[1], p.block_size, head_dim,
                                   p.q.device),
                 triton_us=time_us(p.triton, on_gpu), gather_sdpa_us=time_us(base, on_gpu),
                 min_bytes=p.min_bytes)
    if bandwidth:
        point["roofline_us"] = p.min_bytes / bandwidth * 1e6
        point["triton_fraction_of_roofline"] = point["roofline_us"] / point["triton_us"]
        point["triton_gb_per_s"] = p.min_bytes / point["triton_us"] * 1e-3
    return point


def sweep(p: Problem, on_gpu: bool, configs: list[dict]) -> list[dict]:
    want = p.reference()
    rows = []
    for config in configs:
        p.out.fill_(float("nan"))
        p.triton(**config)
        rows.append(dict(config, rel_error=rel_error(p.out, want), us=time_us(lambda c=config: p.triton(**c), on_gpu)))
    return rows


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "short", "contexts 150-250"), (axes[1], "long", f"contexts {MAX_CONTEXT}")):
        points = results[key]
        x = [pt["batch"] for pt in points]
        ax.plot(x, [pt["triton_us"] for pt in points], "o-", label="triton paged")
        ax.plot(x, [pt["gather_sdpa_us"] for pt in points], "s--", label="gather + SDPA")
        if "roofline_us" in points[0]:
            ax.plot(x, [pt["roofline_us"] for pt in points], "k:", label="bytes / HBM bandwidth")
        for pt in points:
            ax.annotate(f"{pt['splits']} split" + "s" * (pt["splits"] > 1), (pt["batch"], pt["triton_us"]),
                        fontsize=7, textcoords="offset points", xytext=(3, 5))
        ax.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="µs per layer", title=title)
        ax.legend(fontsize=8)
    fig.suptitle(f"paged decode attention, one layer ({results['shape']}, {results['device']})", fontsize=9)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        heads, kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
        short_batches, long_batches = (1, 8, 32, 64, 128), (1, 2, 4, 8)
        bandwidth = common.hbm_bandwidth_bytes_per_s()
    else:  # interpreter smoke run
        heads, kv_heads, head_dim, dtype = 4, 2, 64, torch.float32
        short_batches, long_batches = (1, 3), (1,)
        bandwidth = None
    g = torch.Generator().manual_seed(0)
    results: dict = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu (interpreter)",
                         shape=f"Hq {heads}, Hkv {kv_heads}, D {head_dim}, block 16, {str(dtype).removeprefix('torch.')}",
                         hbm_bytes_per_s=bandwidth, default_keys_per_tile=block_n(head_dim), short=[], long=[])

    def problem(lens: list[int], seed: int) -> Problem:
        return Problem(lens, heads, kv_heads, head_dim, 16, dtype, device, seed)

    for b in short_batches:
        lens = torch.randint(150, 251, (b,), generator=g).tolist()
        results["short"].append(run_point(problem(lens, b), on_gpu, bandwidth))
        print(results["short"][-1], flush=True)
    long = MAX_CONTEXT if on_gpu else 300
    for b in long_batches:
        results["long"].append(run_point(problem([long] * b, 1000 + b), on_gpu, bandwidth))
        print(results["long"][-1], flush=True)
    configs = [dict(keys_per_tile=n, num_warps=w, num_stages=s)
               for n, w, s in ((32, 4, 2), (64, 4, 1), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2))]
    if not on_gpu:
        configs = configs[:2]
    results["sweep"] = {
        "batch 64, contexts 150-250": sweep(problem(torch.randint(150, 251, (64 if on_gpu else 2,),
                                                                  generator=g).tolist(), 7), on_gpu, configs),
        f"batch 1, context {long}": sweep(problem([long], 8), on_gpu, configs),
    }
    common.save("paged_attention", results, plot(results), args.out)


if __name__ == "__main__":
    main()
