"""Prometheus metrics of adapter loading. Labels have bounded values (source, reason, cache),
never the adapter's name, so the series count does not grow with the number of adapters."""

from prometheus_client import Counter, Gauge, Histogram

LOADS = Counter("lorafleet_storage_loads", "Adapter loads that succeeded", ["source", "cache"])
FETCHES = Counter("lorafleet_storage_fetches", "Adapters read from their source (not the disk cache)", ["source"])
FETCHED_BYTES = Counter("lorafleet_storage_fetched_bytes", "Bytes read from adapter sources", ["source"])
CACHE_HITS = Counter("lorafleet_storage_cache_hits", "Disk cache hits")
CACHE_MISSES = Counter("lorafleet_storage_cache_misses", "Disk cache misses")
CACHE_EVICTIONS = Counter("lorafleet_storage_cache_evictions", "Disk cache entries evicted to stay within the size bound")
CACHE_CORRUPT = Counter("lorafleet_storage_cache_corrupt", "Disk cache entries that failed verification (refetched)")
# Replicas on one host usually share the cache folder: in multiprocess mode, report the largest.
CACHE_BYTES = Gauge("lorafleet_storage_cache_bytes", "Bytes held by the disk cache", multiprocess_mode="max")
FAILURES = Counter("lorafleet_storage_failures", "Adapter loads that failed, by reason", ["reason"])
LOAD_SECONDS = Histogram(
    "lorafleet_storage_load_seconds",
    "Time to fetch, validate and stack an adapter in host memory",
    ["source", "cache"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
