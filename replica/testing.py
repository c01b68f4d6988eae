"""Small real artefacts for tests and benchmarks: a seeded random Llama folder (config,
safetensors, a byte-level BPE tokenizer) and PEFT LoRA adapters saved by peft itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from replica.config import EngineConfig
from replica.engine import EngineCore

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Adapters let many tenants share one base model. Ünïcödé text, emoji 🙂 and numbers 12345.",
]


def make_tokenizer(folder: Path, vocab_size: int = 384) -> Any:
    """Train a byte-level BPE tokenizer (so any text round-trips) and save it into folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_llama(
    folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any
) -> Path:
    """Save a seeded random LlamaForCausalLM (+ tokenizer) into folder; config overrides the
    tiny defaults (e.g. rope_scaling, tie_word_embeddings, hidden_size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    defaults: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    cfg = LlamaConfig(vocab_size=len(tokenizer), **{**defaults, **config})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    return folder


def make_peft_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    seed: int,
    use_rslora: bool = False,
) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved by peft's save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        init_lora_weights=False,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # keep deltas modest so logits stay in a comparable range
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


# name -> (rank, alpha, target modules, rsLoRA): different ranks and target-module sets
TINY_ADAPTERS: dict[str, tuple[int, float, list[str], bool]] = {
    "attn8": (8, 16, ["q_proj", "v_proj"], False),
    "all4": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp16": (16, 8, ["o_proj", "gate_proj", "up_proj", "down_proj"], False),
}


def tiny_model_and_adapters(root: Path) -> tuple[Path, dict[str, Path]]:
    """The seeded tiny Llama and the TINY_ADAPTERS under root, built once (reused if complete)."""
    root = Path(root)
    model_dir = root / "tiny-llama"
    adapters = {name: root / name for name in TINY_ADAPTERS}
    done = root / ".complete"
    if not done.exists():
        make_tiny_llama(model_dir, seed=0)
        for i, (name, (r, a, targets, rs)) in enumerate(TINY_ADAPTERS.items()):
            make_peft_adapter(
                model_dir, adapters[name], rank=r, alpha=a, target_modules=targets, seed=i + 1, use_rslora=rs
            )
        done.touch()
    return model_dir, adapters


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """On a shared 2-core machine OpenMP threads spinning against each other make small ops
    ~50x slower; one thread is fastest for tiny test shapes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_core(model_dir: Path, tmp_path: Path, **overrides: Any) -> EngineCore:
    """A CPU EngineCore over a test model, with its adapter cache under tmp_path and 256 KV blocks."""
    cfg: dict[str, Any] = dict(
        model=str(model_dir), adapter_cache_dir=str(tmp_path / "cache"), num_kv_blocks=256, device="cpu"
    )
    cfg.update(overrides)
    return EngineCore(EngineConfig(**cfg))
