"""The base model's shape, as far as adapters care: layers and each projection's in/out features."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    module_shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)

    @classmethod
    def from_config(cls, config: dict, *, name: str | None = None) -> BaseModelSpec:
        """Build from a Llama-family HF config dict. Raises ValueError naming a missing/bad field."""
        model_type = config.get("model_type")
        if model_type not in LLAMA_FAMILY:
            raise ValueError(f"config: model_type {model_type!r} is not one of {LLAMA_FAMILY}")
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if not isinstance(config.get(field), int) or config[field] <= 0:
                raise ValueError(f"config: {field} must be a positive int, got {config.get(field)!r}")
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        inter = config["intermediate_size"]
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        if name is None:
            name = config.get("_name_or_path") or model_type
        return cls(name=name, num_layers=config["num_hidden_layers"], hidden_size=hidden, module_shapes=shapes)

    @classmethod
    def from_pretrained(cls, model_dir: str | pathlib.Path) -> BaseModelSpec:
        """Read `config.json` of a local HF model folder; the folder's name is the model's name."""
        path = pathlib.Path(model_dir)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"model_dir: no config.json in {str(path)!r}")
        return cls.from_config(json.loads(config_path.read_text()), name=path.resolve().name)

    def matches(self, model_name: str) -> bool:
        """Whether an adapter's `base_model_name_or_path` names this model (hub id or local path:
        the last path component is compared, case-insensitively)."""
        return _basename(model_name) == _basename(self.name)


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()
