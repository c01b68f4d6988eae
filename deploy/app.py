"""The Ray Serve application: `import_path: deploy.app:build_app` in serve_config.yaml.

Wires the router's ingress to N engine replicas: validates the config, resolves the base
model and the adapter registry, and attaches the placement router to the engine deployment.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deploy.config import ConfigError, FleetConfig, load_config
from deploy.keys import key_hashes
from replica.deployment import ENV_METRICS_DIR, ENV_METRICS_HOST, ENV_METRICS_PORT, EngineReplica
from router.ingress import Ingress
from router.placement import AdapterAffinityRouter
from storage import AdapterError, AdapterStore, BaseModelSpec, S3Options


def model_dir(config: FleetConfig) -> Path:
    if config.model.demo:
        from deploy.demo import demo_model_dir

        return demo_model_dir()
    return Path(config.model.path or "").expanduser().resolve()


def s3_options(config: FleetConfig) -> S3Options | None:
    s3 = config.engine.s3
    return S3Options(endpoint_url=s3.endpoint_url, region=s3.region, addressing_style=s3.addressing_style) if s3 else None


def adapter_registry(config: FleetConfig, base_dir: Path) -> dict[str, str]:
    """Adapter id -> URI at start: the demo adapters, then each prefix's sub-folders, then static entries."""
    registry: dict[str, str] = {}
    if config.adapters.demo:
        from deploy.demo import DEMO_ADAPTERS

        registry.update({name: str(path) for name, path in DEMO_ADAPTERS.items()})
    if config.adapters.prefixes:
        store = AdapterStore(BaseModelSpec.from_pretrained(base_dir), cache_dir=config.engine.adapter_cache_dir,
                             s3=s3_options(config))
        for i, prefix in enumerate(config.adapters.prefixes):
            try:
                uris = store.list(prefix)
            except AdapterError as exc:
                raise ConfigError(f"adapters.prefixes.{i}: cannot list {prefix!r}: {exc}") from None
            registry.update({uri.rstrip("/").rsplit("/", 1)[-1]: uri for uri in uris})
    registry.update(config.adapters.static)
    return registry


def engine_options(config: FleetConfig, base_dir: Path) -> dict[str, Any]:
    """Keyword arguments of replica.EngineConfig."""
    options = config.engine.model_dump(exclude={"s3"})
    return {**options, "model": str(base_dir), "s3": s3_options(config),
            "served_model_name": config.model.served_name()}


def runtime_env(config: FleetConfig, metrics_dir: str) -> dict[str, Any]:
    """Every process of the application writes its metrics into the node's metrics folder."""
    return {"env_vars": {ENV_METRICS_DIR: metrics_dir, ENV_METRICS_PORT: str(config.metrics.port),
                         ENV_METRICS_HOST: config.metrics.host}}


def build(config: FleetConfig) -> Application:
    base_dir = model_dir(config)
    # A fresh folder per deployment of the app: counters never resume from an old run's files.
    metrics_dir = os.path.join(tempfile.gettempdir(), f"lorafleet-metrics-{uuid.uuid4().hex[:12]}")
    env = runtime_env(config, metrics_dir)
    if config.router.policy == "affinity":
        router_config = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"epsilon": config.router.epsilon, "slack": config.router.slack,
                                   "affinity_wait_s": config.router.affinity_wait_s,
                                   # One period late is expected; older counts are stale.
                                   "stats_max_age_s": 2 * config.router.routing_stats_period_s},
            request_routing_stats_period_s=config.router.routing_stats_period_s,
        )
    else:
        router_config = RequestRouterConfig(request_routing_stats_period_s=config.router.routing_stats_period_s)
    engine = serve.deployment(
        EngineReplica,
        name="engine",
        num_replicas=config.replicas.num_replicas,
        max_ongoing_requests=config.replicas.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replicas.num_cpus, "num_gpus": config.replicas.num_gpus,
                           "runtime_env": env},
        request_router_config=router_config,
    ).bind(engine_options(config, base_dir))
    # One ingress: the adapter registry changed through the admin API lives in it.
    ingress = serve.deployment(
        Ingress,
        name="router",
        num_replicas=1,
        max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": config.router.num_cpus, "runtime_env": env},
    )
    return ingress.bind(
        engine,
        model_name=config.model.served_name(),
        model_dir=str(base_dir),
        adapters=adapter_registry(config, base_dir),
        tenants=[t.model_dump() for t in config.tenants],
        key_hashes=key_hashes(config.auth.keys_file),
        auth_required=config.auth.required,
        default_max_tokens=config.router.default_max_tokens,
        first_output_timeout_s=config.router.first_output_timeout_s,
        api_url=config.router.api_url,
    )


def build_app(args: dict[str, Any]) -> Application:
    """The application builder serve_config.yaml names (its `args` are a FleetConfig)."""
    return build(load_config(args))
