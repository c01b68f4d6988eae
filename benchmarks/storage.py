"""Adapter storage benchmark: fetch + validate + ready-in-host-memory of a rank-16 adapter for all 7
projections of a Llama-3-8B-shaped model (~84 MB bf16), from a local S3 server (moto, in its own
process), cold and from the disk cache. Prints JSON; writes benchmarks/results/storage.{json,png}.

    python -m benchmarks.storage [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import boto3
import torch
from safetensors.torch import save_file

from storage import AdapterStore, BaseModelSpec, S3Options
from storage.sources import S3Source

LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
}
RANK = 16
TARGETS = {"cold_s": 1.0, "cache_s": 0.2}
RESULTS = pathlib.Path(__file__).parent / "results"
KEYS = {"access_key_id": "bench", "secret_access_key": "bench"}


def write_peft_adapter(folder: pathlib.Path, base: BaseModelSpec, rank: int) -> None:
    """Random weights in the layout peft's save_pretrained writes (a real 8B model is not needed)."""
    folder.mkdir(parents=True)
    tensors = {}
    for layer in range(base.num_layers):
        for module, (in_f, out_f) in base.module_shapes.items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, dtype=torch.bfloat16) / 64
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, dtype=torch.bfloat16) / 64
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 32, "target_modules": list(base.module_shapes),
              "use_rslora": False, "bias": "none", "base_model_name_or_path": base.name, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = BaseModelSpec.from_config(LLAMA3_8B, name="Meta-Llama-3-8B")
    server, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            folder = tmp / "adapter"
            write_peft_adapter(folder, base, RANK)
            size = sum(p.stat().st_size for p in folder.iterdir())
            opts = S3Options(endpoint_url=endpoint, region="us-east-1", **KEYS)
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="adapters")
            uri = "s3://adapters/tenant/llama3-8b-r16"
            S3Source(opts).upload(folder, uri)

            def store(cache: str) -> AdapterStore:
                return AdapterStore(base, cache_dir=tmp / cache, s3=opts, max_adapter_bytes=1 << 30)

            store("warmup").load(uri)  # imports, first connections
            cold = [timed(lambda i=i: store(f"cold{i}").load(uri)) for i in range(args.repeats)]
            cached = store("cold0")
            cache = [timed(lambda: cached.load(uri)) for _ in range(args.repeats)]
            local = [timed(lambda: store("local").load(str(folder))) for _ in range(args.repeats)]
            download = []
            for i in range(args.repeats):
                dest = tmp / f"dl{i}"
                dest.mkdir()
                listing = S3Source(opts).stat(uri)
                download.append(timed(lambda d=dest, li=listing: S3Source(opts).download(li, d)))
            w = cached.load(uri)
    finally:
        server.kill()
        server.wait()

    result = {
        "benchmark": "storage",
        "adapter": {"shape": "Llama-3-8B", "rank": RANK, "modules": list(w.modules), "dtype": "bf16",
                    "file_bytes": size, "tensor_bytes": w.nbytes},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
        "repeats": args.repeats,
        "seconds": {
            "cold_fetch_validate_ready": summary(cold),
            "disk_cache_validate_ready": summary(cache),
            "local_folder_validate_ready": summary(local),
            "s3_download_only": summary(download),
        },
        "targets_s": TARGETS,
        "meets_targets": {"cold": statistics.median(cold) < TARGETS["cold_s"],
                          "cache": statistics.median(cache) < TARGETS["cache_s"]},
        "cold_throughput_MBps": size / 1e6 / statistics.median(cold),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "storage.png")
    print(json.dumps(result, indent=2))


def summary(xs: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": [round(x, 4) for x in xs]}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"cold_fetch_validate_ready": "cold (S3)", "disk_cache_validate_ready": "disk cache",
              "local_folder_validate_ready": "local folder", "s3_download_only": "S3 download only"}
    names = list(labels)
    medians = [result["seconds"][n]["median"] for n in names]
    errs = [[m - result["seconds"][n]["min"] for n, m in zip(names, medians, strict=True)],
            [result["seconds"][n]["max"] - m for n, m in zip(names, medians, strict=True)]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([labels[n] for n in names], medians, yerr=errs, capsize=4, color=["C0", "C2", "C1", "C7"])
    ax.axhline(TARGETS["cold_s"], color="C0", ls="--", lw=1, label="target cold 1 s")
    ax.axhline(TARGETS["cache_s"], color="C2", ls="--", lw=1, label="target cache 0.2 s")
    ax.set_ylabel("seconds (median, min-max)")
    a = result["adapter"]
    ax.set_title(f"Load a rank-{a['rank']} Llama-3-8B adapter ({a['file_bytes'] / 1e6:.0f} MB bf16), "
                 f"{result['machine']['cpus']} CPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
