"""Load a Llama-family model from a local Hugging Face folder (config.json + *.safetensors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from replica.model import LlamaModel, ModelArgs

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
# checkpoint name inside a layer -> (our parameter, index of the slice in the merged weight)
_MERGED = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "mlp.gate_proj": ("gate_up_proj", 0),
    "mlp.up_proj": ("gate_up_proj", 1),
}
_PLAIN = {
    "self_attn.o_proj": "o_proj",
    "mlp.down_proj": "down_proj",
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
}


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model folder {model_dir} has no config.json")
    return json.loads(path.read_text())


def load_model(
    model_dir: str | Path, dtype: torch.dtype, device: torch.device, *, load_format: str = "safetensors"
) -> LlamaModel:
    """Build the model on device; weights from the folder's safetensors, or random ("dummy")."""
    if load_format not in ("safetensors", "dummy"):
        raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
    args = ModelArgs.from_config(read_config(model_dir))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: no fp32 copy of every weight
    try:
        with torch.device(device):
            model = LlamaModel(args)
    finally:
        torch.set_default_dtype(default_dtype)
    if load_format == "dummy":
        _init_random(model)
        return model
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {model_dir} has no *.safetensors")
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                target = _target(model, key)
                if target is None:
                    continue
                name, dest = target
                tensor = f.get_tensor(key)
                if dest.shape != tensor.shape:
                    raise ValueError(
                        f"{file.name}: {key} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor)
                loaded.add(name)
    missing = sorted(_expected_names(args) - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights: {missing[:5]}")
    return model


def _init_random(model: LlamaModel, seed: int = 0) -> None:
    gen = torch.Generator(model.embed_tokens.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def _expected_names(args: ModelArgs) -> set[str]:
    names = {"embed_tokens", "norm.weight"} | (set() if args.tie_word_embeddings else {"lm_head"})
    per_layer = list(_PLAIN.values()) + [f"{name}#{part}" for name, part in _MERGED.values()]
    return names | {f"layers.{i}.{n}" for i in range(args.num_layers) for n in per_layer}


def _target(model: LlamaModel, key: str) -> tuple[str, torch.Tensor] | None:
    """The parameter name (for a merged slice: name#slice) and the tensor a checkpoint key fills."""
    if key == "model.embed_tokens.weight":
        return "embed_tokens", model.embed_tokens.data
    if key == "model.norm.weight":
        return "norm.weight", model.norm.weight.data
    if key == "lm_head.weight":
        return ("lm_head", model.lm_head.data) if not model.args.tie_word_embeddings else None
    m = _LAYER_KEY.fullmatch(key)
    if m is None:
        return None
    index, sub = int(m.group(1)), m.group(2)
    layer = model.layers[index]
    prefix = f"layers.{index}."
    if sub in _PLAIN:
        name = _PLAIN[sub]
        return prefix + name, layer.get_parameter(name).data
    if sub in _MERGED:
        name, part = _MERGED[sub]
        weight = layer.get_parameter(name).data
        sizes = (
            [layer.q_size, layer.kv_size, layer.kv_size]
            if name == "qkv_proj"
            else [model.args.intermediate_size] * 2
        )
        start = sum(sizes[:part])
        return f"{prefix}{name}#{part}", weight[start : start + sizes[part]]
    return None
