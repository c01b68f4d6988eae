"""storage/: adapters made by peft itself on a small random Llama, read from a local folder,
compared tensor by tensor; every bad input a typed error naming adapter, file and key.
(The S3 source, the disk cache and the CLI are in test_storage_s3.py.)"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import storage
from storage import AdapterStore, BaseModelSpec

BASE_NAME = "tiny-llama"
BASE_CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass
class PeftAdapter:
    path: pathlib.Path
    rank: int
    scaling: float  # as peft's LoRA layer computes it
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]  # (module, layer) -> (A, B)


def make_adapter(dest: pathlib.Path, *, r: int, targets: list[str] | str, rslora: bool = False,
                 layers: list[int] | None = None, seed: int = 0, safe: bool = True, **lora_kwargs) -> PeftAdapter:
    """A LoRA adapter saved by peft's save_pretrained on a random tiny Llama."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**BASE_CONFIG))
    config = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, use_rslora=rslora,
                        layers_to_transform=layers, init_lora_weights=False, **lora_kwargs)
    model.name_or_path = f"some-org/{BASE_NAME}"  # what a hub checkpoint carries; peft records it
    peft_model = get_peft_model(model, config)
    # save_embedding_layers=False: peft would otherwise look the base model up on the Hub
    peft_model.save_pretrained(dest, safe_serialization=safe, save_embedding_layers=False)
    weights, scaling = {}, None
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = int(name.split(".layers.")[1].split(".")[0])
            weights[(name.rsplit(".", 1)[1], layer)] = (module.lora_A["default"].weight.detach().clone(),
                                                        module.lora_B["default"].weight.detach().clone())
            scaling = module.scaling["default"]
    return PeftAdapter(pathlib.Path(dest), r, scaling, weights)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("models") / BASE_NAME
    LlamaConfig(**BASE_CONFIG).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def base(base_dir: pathlib.Path) -> BaseModelSpec:
    return BaseModelSpec.from_pretrained(base_dir)


@pytest.fixture(scope="session")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> PeftAdapter:
    return make_adapter(tmp_path_factory.mktemp("adapters") / "good", r=4, targets=["q_proj", "v_proj", "down_proj"])


def test_spec_matches_transformers_llama(base: BaseModelSpec) -> None:
    config = LlamaConfig(**BASE_CONFIG)
    model = LlamaForCausalLM(config)
    assert base.name == BASE_NAME and base.num_layers == 3 and base.hidden_size == 64
    layer = model.model.layers[0]
    linears = {**{m: getattr(layer.self_attn, m) for m in ALL_MODULES[:4]},
               **{m: getattr(layer.mlp, m) for m in ALL_MODULES[4:]}}
    assert base.module_shapes == {m: (lin.in_features, lin.out_features) for m, lin in linears.items()}
    assert BaseModelSpec.from_config(config.to_dict(), name="x").module_shapes == base.module_shapes
    with pytest.raises(ValueError, match="model_type"):
        BaseModelSpec.from_config({**config.to_dict(), "model_type": "gpt2"})
    with pytest.raises(ValueError, match="hidden_size"):
        BaseModelSpec.from_config({"model_type": "llama", "num_hidden_layers": 2})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, targets=["q_proj", "v_proj"]),
        dict(r=8, targets=ALL_MODULES, rslora=True),
        dict(r=2, targets=["down_proj", "k_proj"], layers=[1]),
        dict(r=3, targets=r".*\.(o_proj|up_proj)"),
    ],
    ids=["r4-qv", "r8-all-rslora", "r2-layer1", "r3-regex"],
)
def test_load_matches_peft(tmp_path: pathlib.Path, base: BaseModelSpec, kwargs: dict) -> None:
    made = make_adapter(tmp_path / "a", **kwargs)
    w = AdapterStore(base, cache_dir=tmp_path / "cache").load(str(made.path))
    assert isinstance(w, storage.LoRAWeights)
    assert (w.uri, w.name, w.rank) == (str(made.path), "a", made.rank)
    assert w.scaling == pytest.approx(made.scaling) and w.alpha == 2 * made.rank + 1
    assert w.modules == tuple(m for m in ALL_MODULES if any(module == m for module, _ in made.weights))
    assert set(w.modules) == {m for m in ALL_MODULES if m in kwargs["targets"]}
    for module in w.modules:
        in_f, out_f = base.module_shapes[module]
        assert w.lora_a[module].shape == (3, made.rank, in_f)
        assert w.lora_b[module].shape == (3, out_f, made.rank)
        for layer in range(3):
            a, b = made.weights.get((module, layer), (torch.zeros(made.rank, in_f), torch.zeros(out_f, made.rank)))
            torch.testing.assert_close(w.lora_a[module][layer], a, rtol=0, atol=0)
            torch.testing.assert_close(w.lora_b[module][layer], b, rtol=0, atol=0)
    assert w.nbytes == sum(t.nbytes for t in (*w.lora_a.values(), *w.lora_b.values()))
    assert len(w.digest) == 64
    # file:// names the same folder; the digest is of content, not of the name
    assert AdapterStore(base, cache_dir=tmp_path / "cache").load(f"file://{made.path}").digest == w.digest


def test_digest_changes_with_content(tmp_path: pathlib.Path, base: BaseModelSpec) -> None:
    one = make_adapter(tmp_path / "one", r=4, targets=["q_proj"], seed=1)
    two = make_adapter(tmp_path / "two", r=4, targets=["q_proj"], seed=2)
    store = AdapterStore(base, cache_dir=tmp_path / "cache")
    assert store.load(str(one.path)).digest != store.load(str(two.path)).digest


def test_list_local(tmp_path: pathlib.Path, base: BaseModelSpec, good_adapter: PeftAdapter) -> None:
    for name in ("t1/a", "t1/b", "t2/c"):
        shutil.copytree(good_adapter.path, tmp_path / "root" / name)
    store = AdapterStore(base, cache_dir=tmp_path / "cache")
    assert store.list(str(tmp_path / "root" / "t1")) == [str(tmp_path / "root" / "t1" / n) for n in "ab"]
    assert len(store.list(str(tmp_path / "root"))) == 3
    with pytest.raises(storage.AdapterNotFound):
        store.list(str(tmp_path / "nowhere"))


# ---- the bad-input matrix (reused against S3 in test_storage_s3.py) ----


def _edit_config(**changes: object) -> Callable[[pathlib.Path], None]:
    def edit(folder: pathlib.Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        config.update(changes)
        (folder / CONFIG).write_text(json.dumps(config))
    return edit


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[pathlib.Path], None]:
    def edit(folder: pathlib.Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        fn(tensors)
        save_file(tensors, folder / WEIGHTS)
    return edit


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V_B = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"


def _truncate(folder: pathlib.Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _garble_header(folder: pathlib.Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:40] = b"\x00not json at all\xff" * 2
    (folder / WEIGHTS).write_bytes(bytes(data))


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value(tensors[key])
    return fn


def _rename_module(tensors: dict[str, torch.Tensor]) -> None:
    tensors[Q_A.replace("q_proj", "qkv_proj")] = tensors.pop(Q_A)


def _make_pickle(folder: pathlib.Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle; never opened


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[1, 3] = float("nan")
    return t


@dataclass(frozen=True)
class BadCase:
    id: str
    mutate: Callable[[pathlib.Path], None]
    error: type[storage.AdapterError]
    says: tuple[str, ...]  # fragments the message must contain (besides the adapter's URI)
    store_kwargs: tuple[tuple[str, object], ...] = ()


BAD_CASES = [
    BadCase("truncated", _truncate, storage.AdapterValidationError, (WEIGHTS, "truncated")),
    BadCase("corrupt-header", _garble_header, storage.AdapterValidationError, (WEIGHTS, "corrupt")),
    BadCase("missing-config", lambda f: (f / CONFIG).unlink(), storage.AdapterValidationError, (CONFIG, "missing")),
    BadCase("config-not-json", lambda f: (f / CONFIG).write_text("{r: 4"), storage.AdapterValidationError,
            (CONFIG, "JSON")),
    BadCase("wrong-shape", _edit_tensors(_set(Q_A, lambda t: torch.zeros(4, 65))), storage.AdapterValidationError,
            (WEIGHTS, Q_A, "[4, 64]", "[4, 65]")),
    BadCase("rank-mismatch", _edit_config(r=5), storage.AdapterValidationError, (WEIGHTS, "lora_A", "expected [5, ")),
    BadCase("unknown-module-config", _edit_config(target_modules=["q_proj", "c_attn"]),
            storage.AdapterValidationError, (CONFIG, "target_modules", "c_attn")),
    BadCase("unknown-module-tensor", _edit_tensors(_rename_module), storage.AdapterValidationError,
            (WEIGHTS, "qkv_proj")),
    BadCase("rank-over-limit", lambda f: None, storage.AdapterValidationError, (CONFIG, "'r'", "<= 2"),
            (("max_rank", 2),)),
    BadCase("nan", _edit_tensors(_set(V_B, _nan)), storage.AdapterValidationError, (WEIGHTS, V_B, "NaN")),
    BadCase("pickle-only", _make_pickle, storage.UnsupportedAdapter, ("adapter_model.bin", "run code")),
    BadCase("wrong-base", _edit_config(base_model_name_or_path="meta-llama/Llama-3-8B"), storage.BaseModelMismatch,
            (CONFIG, "base_model_name_or_path", "Llama-3-8B", BASE_NAME)),
    BadCase("dora", _edit_config(use_dora=True), storage.UnsupportedAdapter, (CONFIG, "DoRA")),
    BadCase("modules-to-save", _edit_config(modules_to_save=["lm_head"]), storage.UnsupportedAdapter,
            (CONFIG, "modules_to_save")),
    BadCase("embedding", _edit_config(target_modules=["q_proj", "embed_tokens"]), storage.UnsupportedAdapter,
            (CONFIG, "embed_tokens")),
    BadCase("not-lora", _edit_config(peft_type="IA3"), storage.UnsupportedAdapter, (CONFIG, "peft_type", "IA3")),
    BadCase("too-large", lambda f: None, storage.AdapterTooLarge, (WEIGHTS, "<= 1000 bytes"),
            (("max_adapter_bytes", 1000),)),
]


def make_bad(case: BadCase, good: PeftAdapter, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(good.path, dest)
    case.mutate(dest)
    return dest


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_local_adapter(tmp_path: pathlib.Path, base: BaseModelSpec, good_adapter: PeftAdapter,
                           case: BadCase) -> None:
    folder = make_bad(case, good_adapter, tmp_path / "bad")
    store = AdapterStore(base, cache_dir=tmp_path / "cache", **dict(case.store_kwargs))
    with pytest.raises(case.error) as info:
        store.load(str(folder))
    assert type(info.value).__name__ == case.error.__name__
    for fragment in (str(folder), *case.says):
        assert fragment in str(info.value), (fragment, str(info.value))


def test_unsupported_features_made_by_peft(tmp_path: pathlib.Path, base: BaseModelSpec) -> None:
    dora = make_adapter(tmp_path / "dora", r=4, targets=["q_proj"], use_dora=True)
    embed = make_adapter(tmp_path / "embed", r=4, targets=["q_proj", "embed_tokens"])
    store = AdapterStore(base, cache_dir=tmp_path / "cache")
    with pytest.raises(storage.UnsupportedAdapter, match="DoRA"):
        store.load(str(dora.path))
    with pytest.raises(storage.UnsupportedAdapter, match="embed_tokens"):
        store.load(str(embed.path))


def test_base_mismatch_allowed_by_operator(tmp_path: pathlib.Path, base: BaseModelSpec,
                                           good_adapter: PeftAdapter) -> None:
    case = next(c for c in BAD_CASES if c.id == "wrong-base")
    folder = make_bad(case, good_adapter, tmp_path / "other-base")
    w = AdapterStore(base, cache_dir=tmp_path / "cache", allow_base_mismatch=True).load(str(folder))
    assert w.modules == ("q_proj", "v_proj", "down_proj")


def test_missing_folder(tmp_path: pathlib.Path, base: BaseModelSpec) -> None:
    with pytest.raises(storage.AdapterNotFound, match="no such folder"):
        AdapterStore(base, cache_dir=tmp_path / "cache").load(str(tmp_path / "nope"))
