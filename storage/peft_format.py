"""The PEFT LoRA layout (`adapter_config.json` + `adapter_model.safetensors`, as `save_pretrained`
writes it): parsing and every check against the base model, before any tensor is handed on."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from storage.errors import (
    AdapterTooLarge,
    AdapterValidationError,
    BaseModelMismatch,
    UnsupportedAdapter,
)
from storage.spec import MODULES, BaseModelSpec
from storage.weights import LoRAWeights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

# Config fields whose non-default value asks for something the kernels do not compute.
_UNSUPPORTED = (
    ("use_dora", "DoRA (use_dora)"),
    ("modules_to_save", "modules_to_save (full copies of base modules)"),
    ("rank_pattern", "per-module ranks (rank_pattern)"),
    ("alpha_pattern", "per-module alphas (alpha_pattern)"),
    ("fan_in_fan_out", "fan_in_fan_out (Conv1D layout)"),
    ("lora_bias", "LoRA bias (lora_bias)"),
    ("layer_replication", "layer_replication"),
    ("trainable_token_indices", "trainable token embeddings (trainable_token_indices)"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("use_qalora", "QALoRA (use_qalora)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
)
_EMBEDDING_MODULES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    use_rslora: bool
    base_model: str | None
    target_modules: tuple[str, ...] | None  # None when given as a regex string

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_config(adapter: str, raw: bytes) -> AdapterConfig:
    """Parse and check `adapter_config.json` alone (nothing about the base model yet)."""

    def invalid(problem: str, key: str | None = None, expected: object = None, got: object = None):
        return AdapterValidationError(adapter, problem, file=CONFIG_FILE, key=key, expected=expected, got=got)

    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise invalid("not a JSON object")
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapter(adapter, "only LoRA adapters are served", file=CONFIG_FILE, key="peft_type",
                                 expected="'LORA'", got=repr(config.get("peft_type")))
    for key, feature in _UNSUPPORTED:
        if config.get(key):
            raise UnsupportedAdapter(adapter, f"unsupported feature: {feature}", file=CONFIG_FILE, key=key,
                                     expected="unset", got=repr(config[key]))
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter(adapter, "unsupported feature: trained biases", file=CONFIG_FILE, key="bias",
                                 expected="'none'", got=repr(config["bias"]))
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise invalid("bad rank", key="r", expected="a positive int", got=repr(rank))
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise invalid("bad lora_alpha", key="lora_alpha", expected="a finite number", got=repr(alpha))
    targets = config.get("target_modules")
    if isinstance(targets, list):
        # peft matches entries as name suffixes ("self_attn.q_proj" targets q_proj)
        targets = tuple(str(t).rsplit(".", 1)[-1] for t in targets)
        for t in targets:
            if t in _EMBEDDING_MODULES:
                raise UnsupportedAdapter(adapter, f"unsupported feature: LoRA on {t}", file=CONFIG_FILE,
                                         key="target_modules", expected=f"a subset of {list(MODULES)}", got=t)
    elif not isinstance(targets, str):
        raise invalid("bad target_modules", key="target_modules", expected="a list or a regex", got=repr(targets))
    else:
        targets = None
    return AdapterConfig(rank=rank, alpha=float(alpha), use_rslora=bool(config.get("use_rslora", False)),
                         base_model=config.get("base_model_name_or_path") or None, target_modules=targets)


def check_base(adapter: str, config: AdapterConfig, base: BaseModelSpec, *, max_rank: int,
               allow_base_mismatch: bool) -> None:
    """Checks of the config against the base model and the deployment's limits."""
    if config.base_model is not None and not allow_base_mismatch and not base.matches(config.base_model):
        raise BaseModelMismatch(adapter, "trained on a different base model", file=CONFIG_FILE,
                                key="base_model_name_or_path", expected=repr(base.name), got=repr(config.base_model))
    if config.rank > max_rank:
        raise AdapterValidationError(adapter, "rank over the deployment's limit", file=CONFIG_FILE, key="r",
                                     expected=f"<= {max_rank}", got=config.rank)
    for t in config.target_modules or ():
        if t not in base.module_shapes:
            raise AdapterValidationError(adapter, f"targets a module the base model does not have: {t!r}",
                                         file=CONFIG_FILE, key="target_modules",
                                         expected=f"a subset of {list(base.module_shapes)}", got=t)


def content_digest(sha256: dict[str, str]) -> str:
    """One digest of an adapter from its files' sha256 (config and weights)."""
    return hashlib.sha256(f"{sha256[CONFIG_FILE]}:{sha256[WEIGHTS_FILE]}".encode()).hexdigest()


def read_adapter(
    uri: str,
    folder: pathlib.Path,
    base: BaseModelSpec,
    *,
    max_rank: int,
    max_bytes: int,
    digest: str,
    allow_base_mismatch: bool = False,
) -> LoRAWeights:
    """Read a PEFT folder (local files), validate everything, and stack per module.
    `digest` is the content digest of the files (see content_digest), hashed by the caller."""
    check_files(uri, {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}, max_bytes)
    config = parse_config(uri, (folder / CONFIG_FILE).read_bytes())
    check_base(uri, config, base, max_rank=max_rank, allow_base_mismatch=allow_base_mismatch)
    lora_a, lora_b = _read_tensors(uri, folder / WEIGHTS_FILE, config, base)
    modules = tuple(m for m in MODULES if m in lora_a)
    lora_a, lora_b = {m: lora_a[m] for m in modules}, {m: lora_b[m] for m in modules}
    return LoRAWeights(
        uri=uri,
        name=uri.rstrip("/").rsplit("/", 1)[-1],
        rank=config.rank,
        alpha=config.alpha,
        scaling=config.scaling,
        modules=modules,
        lora_a=lora_a,
        lora_b=lora_b,
        digest=digest,
        nbytes=sum(t.nbytes for t in (*lora_a.values(), *lora_b.values())),
    )


def check_files(uri: str, sizes: dict[str, int], max_bytes: int) -> None:
    """Checks on the listing alone (file names and sizes), before anything is downloaded."""
    if WEIGHTS_FILE not in sizes:
        pickles = [p for p in PICKLE_FILES if p in sizes]
        if pickles:
            raise UnsupportedAdapter(uri, "pickle weights are refused: loading them would run code from the file; "
                                     "re-save the adapter with safetensors (save_pretrained's default)",
                                     file=pickles[0], expected=WEIGHTS_FILE)
        raise AdapterValidationError(uri, "missing weights file", file=WEIGHTS_FILE, expected="a safetensors file")
    if CONFIG_FILE not in sizes:
        raise AdapterValidationError(uri, "missing config file", file=CONFIG_FILE, expected="PEFT adapter config")
    total = sizes[WEIGHTS_FILE] + sizes[CONFIG_FILE]
    if total > max_bytes:
        raise AdapterTooLarge(uri, "adapter files too large", file=WEIGHTS_FILE, expected=f"<= {max_bytes} bytes",
                              got=f"{total} bytes")


def _read_tensors(
    uri: str, path: pathlib.Path, config: AdapterConfig, base: BaseModelSpec
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    def invalid(problem: str, key: str | None = None, expected: object = None, got: object = None):
        return AdapterValidationError(uri, problem, file=WEIGHTS_FILE, key=key, expected=expected, got=got)

    r = config.rank
    try:
        with safe_open(str(path), framework="pt") as f:
            # Pass 1: names, dtypes and shapes from the header only.
            found: dict[tuple[str, int, str], str] = {}
            dtypes = set()
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                m = _KEY.match(key)
                if m is None:
                    raise _unexpected_key(uri, key)
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                if module not in base.module_shapes:
                    raise invalid(f"module the base model does not have: {module!r}", key=key,
                                  expected=f"one of {list(base.module_shapes)}", got=module)
                if config.target_modules is not None and module not in config.target_modules:
                    raise invalid("module not in the config's target_modules", key=key,
                                  expected=f"one of {list(config.target_modules)}", got=module)
                if layer >= base.num_layers:
                    raise invalid("layer index out of range", key=key, expected=f"< {base.num_layers}", got=layer)
                dtype = f.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise invalid("unsupported dtype", key=key, expected=f"one of {list(FLOAT_DTYPES)}", got=dtype)
                in_f, out_f = base.module_shapes[module]
                want = [r, in_f] if ab == "A" else [out_f, r]
                shape = list(f.get_slice(key).get_shape())
                if shape != want:
                    raise invalid(f"wrong shape for lora_{ab} of {module}", key=key, expected=want, got=shape)
                found[(module, layer, ab)] = key
                dtypes.add(FLOAT_DTYPES[dtype])
            if not found:
                raise invalid("no LoRA tensors in the file", expected="lora_A/lora_B weights")
            for module, layer, ab in found:
                other = "B" if ab == "A" else "A"
                if (module, layer, other) not in found:
                    raise invalid(f"lora_{ab} without lora_{other}", key=found[(module, layer, ab)],
                                  expected=f"a matching lora_{other}", got="none")
            if config.target_modules is not None:
                missing = [t for t in config.target_modules if not any(k[0] == t for k in found)]
                if missing:
                    raise invalid("target_modules with no tensors", expected=f"tensors for {missing}", got="none")
            # Pass 2: one stack per module and side, copied once out of the mmap; layers the
            # adapter does not target are zeros.
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            lora_a: dict[str, torch.Tensor] = {}
            lora_b: dict[str, torch.Tensor] = {}
            for module in dict.fromkeys(m for m, _, _ in found):
                in_f, out_f = base.module_shapes[module]
                for ab, stacks, shape in (("A", lora_a, (r, in_f)), ("B", lora_b, (out_f, r))):
                    layers = {layer: f.get_tensor(k).to(dtype) for (m, layer, side), k in found.items()
                              if m == module and side == ab}
                    stacks[module] = _stack(layers, base.num_layers, shape, dtype)
    except SafetensorError as e:
        raise invalid(f"corrupt or truncated safetensors: {e}") from None
    for ab, stacks in (("A", lora_a), ("B", lora_b)):
        for module, stack in stacks.items():
            if not _all_finite(stack):
                layer = int((~torch.isfinite(stack)).flatten(1).any(1).nonzero()[0])
                raise invalid("non-finite values (NaN or Inf)", key=found[(module, layer, ab)],
                              expected="finite values")
    return lora_a, lora_b


# The copies and checks below go through numpy, single-threaded, on purpose: this memory-bound
# work gains nothing from torch's OpenMP threads, whose barriers stall (5-20x) when the cores are
# busy, as they are next to a running model or on a shared host.


_SAME_SIZE_INT = {torch.float16: np.int16, torch.bfloat16: np.int16, torch.float32: np.int32}


def _stack(layers: dict[int, torch.Tensor], num_layers: int, shape: tuple[int, int],
           dtype: torch.dtype) -> torch.Tensor:
    """[num_layers, *shape]: the given layers, zeros elsewhere (calloc'd, so free until written)."""
    out = torch.from_numpy(np.zeros((num_layers, *shape), dtype=_SAME_SIZE_INT[dtype]))
    raw = out.numpy()
    for layer, t in layers.items():
        raw[layer] = t.view(out.dtype).numpy()
    return out.view(dtype)


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: Inf/NaN have all exponent bits set
        bits = t.view(torch.int16).numpy()
        return not any(((layer & 0x7F80) == 0x7F80).any() for layer in bits)  # per layer: cache-sized temps
    return bool(np.isfinite(t.numpy()).all())


def _unexpected_key(uri: str, key: str) -> AdapterValidationError:
    if any(name in key for name in _EMBEDDING_MODULES) or "lora_embedding" in key:
        return UnsupportedAdapter(uri, "unsupported feature: embedding / lm_head LoRA", file=WEIGHTS_FILE, key=key)
    if "lora_magnitude_vector" in key:
        return UnsupportedAdapter(uri, "unsupported feature: DoRA", file=WEIGHTS_FILE, key=key)
    if ".bias" in key:
        return UnsupportedAdapter(uri, "unsupported feature: LoRA bias", file=WEIGHTS_FILE, key=key)
    return AdapterValidationError(uri, "unexpected tensor", file=WEIGHTS_FILE, key=key,
                                  expected="model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight")


def spec_from_adapter(uri: str, folder: pathlib.Path) -> BaseModelSpec:
    """The smallest base model this adapter fits, read from its safetensors header: lets an adapter
    be checked for internal consistency (pairs, ranks, shapes, finiteness) without its base model."""
    check_files(uri, {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}, max_bytes=1 << 62)
    config = parse_config(uri, (folder / CONFIG_FILE).read_bytes())
    shapes: dict[str, list[int]] = {}
    num_layers = 0
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                m = _KEY.match(key)
                if m is None or m.group(2) not in MODULES:
                    continue  # reported by read_adapter
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                num_layers = max(num_layers, layer + 1)
                shape = f.get_slice(key).get_shape()
                dims = shapes.setdefault(module, [0, 0])
                dims[0 if ab == "A" else 1] = shape[-1] if ab == "A" else shape[0]
    except SafetensorError as e:
        raise AdapterValidationError(uri, f"corrupt or truncated safetensors: {e}", file=WEIGHTS_FILE) from None
    return BaseModelSpec(name=config.base_model or "unknown", num_layers=max(num_layers, 1), hidden_size=0,
                         module_shapes={m: (d[0], d[1]) for m, d in shapes.items()})
