"""Small real fleets for tests and benchmarks: a tiny random Llama with a chat template, random
PEFT adapters, a keys file, and Ray Serve started on 127.0.0.1 with its files in temporary folders."""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from deploy.keys import add_key
from replica.testing import make_peft_adapter, make_tiny_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(root: Path) -> Path:
    model_dir = make_tiny_llama(root / "tiny-llama", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir


def make_adapters(model_dir: Path, root: Path, names: list[str]) -> dict[str, str]:
    return {
        name: str(make_peft_adapter(model_dir, root / name, rank=4, alpha=8.0,
                                    target_modules=["q_proj", "v_proj", "down_proj"], seed=100 + i))
        for i, name in enumerate(names)
    }


def isolate_ray(root: Path) -> str:
    """Point HOME and Ray's temp folder at fresh folders (short: Ray puts sockets there)."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    os.environ["HOME"] = str(home)
    ray_tmp = tempfile.mkdtemp(prefix="lfray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    return ray_tmp


@dataclass
class Fleet:
    base_url: str
    metrics_url: str
    model_dir: Path
    adapters: dict[str, str]
    keys: dict[str, str]  # tenant -> key
    config: dict[str, Any]


def start_ray(root: Path) -> int:
    """ray.init + serve.start with HTTP on 127.0.0.1 (a free port, returned)."""
    import ray
    from ray import serve

    http_port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=isolate_ray(root), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    return http_port


def deploy(root: Path, http_port: int, config: dict[str, Any], tenants: list[str],
           name: str = "lorafleet") -> Fleet:
    """serve.run deploy.app with API keys for `tenants` and the node metrics on a free port."""
    from ray import serve

    from deploy.app import build
    from deploy.config import load_config

    keys_file = root / f"{name}-keys.json"
    keys = {t: add_key(keys_file, t) for t in tenants}
    metrics_port = free_port()
    config = {
        **config,
        "auth": {"required": True, "keys_file": str(keys_file)},
        "metrics": {"port": metrics_port, "host": "127.0.0.1"},
        "router": {"api_url": f"http://127.0.0.1:{http_port}", **config.get("router", {})},
    }
    serve.run(build(load_config(config)), name=name, route_prefix="/")
    return Fleet(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics",
                 Path(config["model"]["path"]), dict(config["adapters"]["static"]), keys, config)


def start_fleet(root: Path, config: dict[str, Any], tenants: list[str]) -> Fleet:
    """A fleet on a fresh Ray instance; stop_fleet() shuts both down."""
    return deploy(root, start_ray(root), config, tenants)


def stop_fleet() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def scrape(metrics_url: str) -> dict[tuple[str, tuple], float]:
    """One scrape of a Prometheus endpoint: (sample name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """Sum of a scraped sample over the series whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, labels[k]) in ls for k in labels))
