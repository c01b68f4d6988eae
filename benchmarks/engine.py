"""Engine benchmark: python -m benchmarks.engine [--tiny] [--out DIR] [--plot-only]

Offline generation through the replica's EngineCore on a Llama-3-8B-shaped model with random
bf16 weights (no download): batch 64, 64-token prompts, 128 generated tokens with EOS ignored,
7 adapters of rank 16 on all seven projections. Tokens per second for base-only rows, one
adapter for all rows, and the 7 adapters mixed. First, a check that the engine's greedy tokens
equal transformers' greedy tokens (same dtype, same device) for a small random Llama.
--tiny runs the same code with small shapes (the CPU check). Writes <out>/engine.json and,
where matplotlib is installed, engine.png (--plot-only draws the PNG from an existing JSON)."""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from replica import EngineConfig, EngineCore, LoRARequest, SamplingParams
from replica.testing import make_tiny_llama, make_tokenizer
from storage import BaseModelSpec

RESULTS_DIR = Path(__file__).parent / "results"
LLAMA3_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip
TINY = dict(
    model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
)  # fmt: skip
NUM_ADAPTERS, RANK = 7, 16


@dataclass(frozen=True)
class RandomLoRA:
    """In-memory adapter weights with the fields the adapter pool reads from storage.LoRAWeights:
    random weights for an 8B-shaped model, with no files to write or validate."""

    name: str
    rank: int
    scaling: float
    modules: tuple[str, ...]
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]


class RandomAdapterStore:
    """Adapters on every projection, made on request (no files, no network). ranks gives some URIs
    a rank of their own; the others have rank."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        rank: int = RANK,
        std: float = 0.02,
        ranks: dict[str, int] | None = None,
    ) -> None:
        self.shapes, self.num_layers, self.rank, self.std = shapes, num_layers, rank, std
        self.ranks = dict(ranks or {})

    def load(self, uri: str) -> RandomLoRA:
        gen = torch.Generator().manual_seed(zlib.crc32(uri.encode()))
        r, std, layers = self.ranks.get(uri, self.rank), self.std, self.num_layers
        a = {m: torch.randn(layers, r, i, generator=gen) * std for m, (i, _) in self.shapes.items()}
        b = {m: torch.randn(layers, o, r, generator=gen) * std for m, (_, o) in self.shapes.items()}
        return RandomLoRA(uri, r, 2.0, tuple(self.shapes), a, b)


def greedy_check(device: str, dtype: torch.dtype, tmp: Path) -> dict:
    """The engine's greedy tokens against transformers' on one short prompt, same dtype and device:
    for the base model, and for a rank-8 adapter on all projections (merged into transformers'
    weights in fp32, applied by the engine through the LoRA kernels)."""
    model_dir = make_check_llama(tmp, dtype)
    shape = BaseModelSpec.from_pretrained(model_dir)
    store = RandomAdapterStore(shape.module_shapes, shape.num_layers, rank=8, std=0.1)
    adapter = LoRARequest("check", "random://check")
    core = EngineCore(EngineConfig(model=str(model_dir), dtype=dtype_name(dtype), device=device, num_kv_blocks=64),
                      store=store)  # fmt: skip
    prompt, new = [5, 17, 99, 3, 250, 42, 7, 300], 24
    results = {}
    for name, lora in (("base", None), ("adapter", store.load(adapter.uri))):
        # transformers in the engine's dtype, and in fp32 to show how far either drifts in bf16
        expected, fp32 = (hf_greedy(model_dir, lora, prompt, new, device, d) for d in (dtype, torch.float32))
        if lora is not None:
            core.pool.request(adapter)
            while core.pool.ensure(adapter) != "ready":
                time.sleep(0.01)
        seq = core.make_sequence(prompt, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True),
                                 adapter if lora is not None else None)  # fmt: skip
        core.add(seq)
        while core.has_work:
            core.step()
        results[name] = {
            "tokens": new, "equal": seq.output_ids == expected, "first_difference": first_difference(seq.output_ids, expected),
            "engine_vs_fp32_first_difference": first_difference(seq.output_ids, fp32),
            "transformers_vs_fp32_first_difference": first_difference(expected, fp32),
            "engine": seq.output_ids, "transformers": expected,
        }  # fmt: skip
    core.pool.shutdown()
    return results


def make_check_llama(tmp: Path, dtype: torch.dtype) -> Path:
    """The small random Llama the token checks run on (its logits are far apart: few near-ties)."""
    return make_tiny_llama(
        tmp / "check-llama", seed=0, dtype=dtype, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, initializer_range=0.1, rope_scaling=None,
    )  # fmt: skip


def write_dummy_model(config: dict, folder: Path) -> Path:
    """A model folder of config.json and a tokenizer only, for load_format="dummy"."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    make_tokenizer(folder)  # prompts are token ids; ids beyond its vocabulary decode to nothing
    return folder


def hf_greedy(
    model_dir: Path, lora: RandomLoRA | None, prompt: list[int], new: int, device: str, dtype: torch.dtype
) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora is not None:
        merge(model, lora)
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def merge(model: torch.nn.Module, lora: RandomLoRA) -> None:
    """W += scaling * B @ A for every layer and module, in the model's (fp32) weights."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for m in lora.modules:
                hf_projection(layer, m).weight += lora.scaling * lora.lora_b[m][i] @ lora.lora_a[m][i]


def hf_projection(layer: torch.nn.Module, module: str) -> torch.nn.Module:
    """A transformers Llama decoder layer's projection of this name (q_proj ... down_proj)."""
    return getattr(
        layer.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, module
    )


def throughput(
    config: dict,
    device: str,
    dtype: torch.dtype,
    tmp: Path,
    batch: int,
    prompt_len: int,
    gen_len: int,
    profile_steps: int = 0,
) -> dict:
    free_memory()  # the check's memory goes back before the KV cache is sized
    model_dir = write_dummy_model(config, tmp / "bench-model")
    # On the GPU the KV cache is sized from the memory budget, as in serving.
    blocks = None if device == "cuda" else batch * -(-(prompt_len + gen_len) // 16)
    cfg = EngineConfig(
        model=str(model_dir), load_format="dummy", dtype=dtype_name(dtype), device=device, max_num_seqs=batch,
        max_num_batched_tokens=batch * prompt_len, max_loras=8, max_lora_rank=RANK, num_kv_blocks=blocks,
    )  # fmt: skip
    shape = BaseModelSpec.from_config(config)
    start = time.perf_counter()
    core = EngineCore(cfg, store=RandomAdapterStore(shape.module_shapes, shape.num_layers))
    load_s = time.perf_counter() - start
    adapters = [LoRARequest(f"tenant{i}", f"random://{i}") for i in range(NUM_ADAPTERS)]
    for a in adapters:
        core.pool.request(a)
    while any(core.pool.ensure(a) != "ready" for a in adapters):
        time.sleep(0.05)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, config["vocab_size"], (prompt_len,), generator=gen).tolist() for _ in range(batch)
    ]
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    scenarios = {
        "base_only": [None] * batch,
        "one_adapter": [adapters[0]] * batch,
        "mixed_7_adapters": [adapters[i % NUM_ADAPTERS] for i in range(batch)],
    }
    results = {"model_load_s": round(load_s, 2), "kv_blocks": core.blocks.num_blocks}
    run(core, prompts[:2], SamplingParams(max_tokens=4), [None, adapters[0]])  # warm-up (compiles kernels)
    for name, rows in scenarios.items():
        results[name] = run(core, prompts, params, rows)
        print(name, results[name], flush=True)
    if profile_steps:
        for name in ("base_only", "mixed_7_adapters"):
            print(f"--- profile: {profile_steps} decode steps, {name}", flush=True)
            print(profile(core, prompts, scenarios[name], profile_steps), flush=True)
    return results


def profile(core: EngineCore, prompts: list[list[int]], adapters: list, steps: int) -> str:
    """Where decode steps spend their time: Python functions (cProfile) and torch ops (profiler)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    params = SamplingParams(max_tokens=2 * steps + 2, temperature=0, ignore_eos=True)
    for p, a in zip(prompts, adapters, strict=True):
        core.add(core.make_sequence(p, params, a))
    core.step()  # prefill
    py = cProfile.Profile()
    py.enable()
    for _ in range(steps):
        core.step()
    py.disable()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if core.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            core.step()
    while core.has_work:
        core.step()
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(20)
    table = prof.key_averages()
    device_sort = "self_cuda_time_total" if core.device.type == "cuda" else "self_cpu_time_total"
    return "\n".join([text.getvalue(), table.table(sort_by="self_cpu_time_total", row_limit=20),
                      table.table(sort_by=device_sort, row_limit=15)])  # fmt: skip


def run(core: EngineCore, prompts: list[list[int]], params: SamplingParams, adapters: list) -> dict:
    seqs = [core.make_sequence(p, params, a) for p, a in zip(prompts, adapters, strict=True)]
    sync = torch.cuda.synchronize if core.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for s in seqs:
        core.add(s)
    core.step()  # the whole batch's prompts in one step
    core.step()  # their first tokens come out (and the first decode step is launched)
    prefill = time.perf_counter() - start
    decode_steps = int(core.last_num_scheduled > 0)
    while core.has_work:
        core.step()
        decode_steps += core.last_num_scheduled > 0
    sync()
    total = time.perf_counter() - start
    generated = sum(len(s.output_ids) for s in seqs)
    return {
        "generated_tokens": generated,
        "steps": decode_steps + 1,
        "seconds": round(total, 3),
        "tokens_per_s": round(generated / total, 1),
        "prefill_s": round(prefill, 3),
        "time_to_first_token_ms": round(prefill * 1e3, 2),  # every prompt in one step, until its tokens are out
        "decode_tokens_per_s": round((generated - len(seqs)) / (total - prefill), 1),
        "decode_step_ms": round((total - prefill) / max(decode_steps, 1) * 1e3, 3),
    }


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["base_only", "one_adapter", "mixed_7_adapters"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [results["throughput"][n]["tokens_per_s"] for n in names]
    ax.bar(names, values, color=["#888", "#4a8", "#48c"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{results['model']}, batch {results['batch']}, {results['prompt_len']}+{results['gen_len']} "
                 f"tokens\n{results['device']}", fontsize=9)  # fmt: skip
    fig.savefig(png, dpi=110, bbox_inches="tight")


def free_memory() -> None:
    """Give a finished phase's GPU memory back before the next one sizes its buffers."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (the CPU check)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also print where STEPS decode steps spend their time")  # fmt: skip
    parser.add_argument("--plot-only", action="store_true", help="draw engine.png from engine.json")
    args = parser.parse_args()
    json_path, png_path = args.out / "engine.json", args.out / "engine.png"
    if args.plot_only:
        plot(json.loads(json_path.read_text()), png_path)
        return
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tiny = args.tiny or not cuda
    batch, prompt_len, gen_len = (8, 16, 16) if tiny else (64, 64, 128)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            check = greedy_check(device, dtype, Path(tmp))
        except Exception:  # still measure throughput; the JSON carries the failure
            check = {"error": traceback.format_exc()}
        print("greedy check:", check, flush=True)
        results = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "dtype": dtype_name(dtype),
            "torch": torch.__version__,
            "model": "tiny random Llama" if tiny else "Llama-3-8B-shaped, random weights",
            "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
            "adapters": f"{NUM_ADAPTERS} x rank {RANK}, all 7 projections",
            "greedy_matches_transformers": check,
            "throughput": throughput(TINY if tiny else LLAMA3_8B, device, dtype, Path(tmp), batch, prompt_len, gen_len,
                                     args.profile),
        }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    try:
        plot(results, png_path)
    except ImportError:
        print("matplotlib is not installed: no PNG (run with --plot-only where it is)")


if __name__ == "__main__":
    main()
