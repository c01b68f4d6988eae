"""The router's Prometheus metrics (the replicas' are in replica/deployment.py).

Written through prometheus-client's multiprocess mode when PROMETHEUS_MULTIPROC_DIR is
set (deploy/app.py sets it for every process of the application), so one exporter per
node serves the metrics of all its processes.
"""

from __future__ import annotations

import os

from prometheus_client import Counter

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

ROUTING_DECISIONS = Counter(
    "lorafleet_routing_decisions",
    "Requests placed on an engine replica: affine (the adapter's first replica), spilled "
    "(a later one: the first was over the load bound or full), base (no adapter).",
    ["replica", "decision"],
)
