"""The config schema and the application builder's wiring (no Ray started)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from deploy.app import adapter_registry, engine_options
from deploy.config import ConfigError, load_config
from deploy.keys import add_key, key_hashes
from replica import EngineConfig
from replica.testing import make_peft_adapter, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    model = make_tiny_llama(root / "tiny-llama", seed=0)
    for i, name in enumerate(("x", "y")):
        make_peft_adapter(model, root / "prefix" / name, rank=2, alpha=4.0, target_modules=["q_proj"], seed=i)
    return model, root


def base_args(model) -> dict:
    return {"model": {"path": str(model)}, "auth": {"required": False}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"engine": {"max_loras": 0}}, "engine.max_loras"),
        ({"engine": {"max_loras": 8, "max_cpu_loras": 4}}, "engine"),
        ({"engine": {"kernel_backend": "fast"}}, "engine.kernel_backend"),
        ({"engine": {"max_lorass": 2}}, "engine.max_lorass"),
        ({"replicas": {"num_replicas": 0}}, "replicas.num_replicas"),
        ({"router": {"policy": "random"}}, "router.policy"),
        ({"model": {"path": "/nonexistent"}}, "model"),
        ({"model": {"demo": True, "path": "/x"}}, "model"),
        ({"tenants": [{"name": "a"}, {"name": "a"}]}, "tenants"),
        ({"auth": {"required": True}}, "(top level)"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
    ],
)
def test_bad_config_names_the_field(tiny, change, field):
    model, _ = tiny
    with pytest.raises(ConfigError) as err:
        load_config({**base_args(model), **change})
    assert f"{field}:" in str(err.value)


def test_engine_options_are_engine_config_arguments(tiny):
    model, _ = tiny
    config = load_config({**base_args(model), "model": {"path": str(model), "name": "tiny"},
                          "engine": {"max_loras": 3, "max_cpu_loras": 6, "num_kv_blocks": 10}})
    engine = EngineConfig(**engine_options(config, model))
    assert (engine.max_loras, engine.max_cpu_loras, engine.num_kv_blocks) == (3, 6, 10)
    assert engine.served_model_name == "tiny" and engine.model == str(model)


def test_registry_from_prefix_and_static_entries(tiny):
    model, root = tiny
    config = load_config({**base_args(model), "adapters": {
        "prefixes": [str(root / "prefix")], "static": {"y": "/elsewhere/y", "z": "/z"}}})
    registry = adapter_registry(config, model)
    assert registry == {"x": str(root / "prefix" / "x"), "y": "/elsewhere/y", "z": "/z"}


def test_keys_file_holds_hashes_only(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "acme")
    assert key not in path.read_text()
    hashes = key_hashes(str(path))
    assert list(hashes.values()) == ["acme"] and oct(path.stat().st_mode)[-3:] == "600"
    with pytest.raises(ConfigError, match=r"auth\.keys_file"):
        key_hashes(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a lorafleet keys file"):
        key_hashes(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_shipped_serve_configs_validate(path):
    app = yaml.safe_load(pathlib.Path(path).read_text())["applications"][0]
    assert app["import_path"] == "deploy.app:build_app"
    args = app["args"]
    if args.get("model", {}).get("path"):
        args = {**args, "model": {"demo": True}}  # the GPU config's model folder is the operator's
    if args.get("auth", {}).get("keys_file"):
        args = {**args, "auth": {**args["auth"], "keys_file": None}}
    load_config(args)


def test_grafana_dashboard_uses_the_exported_metrics():
    import re

    from prometheus_client import REGISTRY

    import replica.deployment  # noqa: F401  (defines the replicas' metrics)
    import router.metrics  # noqa: F401

    exported = {family.name for family in REGISTRY.collect()}
    dashboard = pathlib.Path("deploy/grafana_dashboard.json").read_text()
    used = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in re.findall(r"lorafleet_\w+", dashboard)}
    assert used and used <= exported, used - exported
