"""One Prometheus scrape target per node for every process of the application.

Every Ray worker of the application writes its metrics through prometheus-client's
multiprocess mode into one folder per node (PROMETHEUS_MULTIPROC_DIR, set by deploy/app.py).
`setup_worker` runs first in each of those workers (Ray's worker_process_setup_hook): it
creates the folder and keeps trying to serve the folder's metrics on the node's metrics
port, so exactly one process per node serves them and another takes over if it dies.
"""

from __future__ import annotations

import errno
import glob
import os
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
ENV_PORT = "LORAFLEET_METRICS_PORT"
ENV_HOST = "LORAFLEET_METRICS_HOST"
RETRY_S = 10.0


class LiveMultiProcessCollector(MultiProcessCollector):
    """Drops the live gauges of processes that have exited before collecting, so a dead
    replica's queue length and resident adapters stop being reported."""

    def __init__(self, path: str, registry: CollectorRegistry):
        super().__init__(registry, path)
        self._dir = path

    def collect(self) -> Iterator[Metric]:
        for path in glob.glob(os.path.join(self._dir, "gauge_live*_*.db")):
            pid = int(os.path.basename(path).rsplit("_", 1)[1].removesuffix(".db"))
            if not _alive(pid):
                mark_process_dead(pid, self._dir)
        return super().collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve_node_metrics(path: str, port: int, host: str) -> bool:
    """Serve the folder's metrics on host:port; False when another process already does."""
    registry = CollectorRegistry()
    LiveMultiProcessCollector(path, registry)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    return True


def setup_worker() -> None:
    """Ray worker_process_setup_hook of the application's actors."""
    path = os.environ.get(ENV_DIR)
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    port = int(os.environ.get(ENV_PORT, "0"))
    if port:
        host = os.environ.get(ENV_HOST, "0.0.0.0")
        threading.Thread(target=_keep_serving, args=(path, port, host), daemon=True,
                         name="lorafleet-metrics").start()


def _keep_serving(path: str, port: int, host: str) -> None:
    stop = threading.Event()
    while not serve_node_metrics(path, port, host):
        stop.wait(RETRY_S)
