"""AdapterStore: URI in, validated host tensors out, through the disk cache; thread-safe."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from storage import metrics
from storage.cache import DiskCache, hash_files
from storage.errors import AdapterError, StorageUnavailable
from storage.peft_format import check_files, content_digest, read_adapter
from storage.sources import ADAPTER_FILES, LocalSource, Progress, S3Options, S3Source, is_s3, local_path
from storage.spec import BaseModelSpec
from storage.weights import LoRAWeights

T = TypeVar("T")


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "lorafleet" / "adapters"


class AdapterStore:
    def __init__(
        self,
        base: BaseModelSpec,
        *,
        cache_dir: str | os.PathLike | None = None,
        cache_max_bytes: int = 8 << 30,
        max_rank: int = 64,
        max_adapter_bytes: int = 2 << 30,
        allow_base_mismatch: bool = False,
        s3: S3Options | None = S3Options(),
        progress: Progress | None = None,
    ) -> None:
        self.base = base
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.allow_base_mismatch = allow_base_mismatch
        self.cache = DiskCache(cache_dir if cache_dir is not None else default_cache_dir(), cache_max_bytes)
        self._s3_options = s3
        self._s3: S3Source | None = None
        self._s3_lock = threading.Lock()
        self._local = LocalSource()
        self._progress = progress
        self._flight = SingleFlight()

    def load(self, uri: str) -> LoRAWeights:
        """Fetch (through the disk cache), validate and return the adapter at `uri`. Concurrent
        calls for the same URI share one fetch. Raises a storage.errors.AdapterError subclass."""
        return self._flight.run(uri, lambda: self._load(uri))

    def list(self, uri_prefix: str) -> list[str]:
        """URIs of the adapters (folders holding adapter_config.json) under a prefix."""
        return self._source(uri_prefix).list(uri_prefix)

    def _load(self, uri: str) -> LoRAWeights:
        start = time.perf_counter()
        source = "s3" if is_s3(uri) else "local"
        try:
            weights, cache = self._load_s3(uri) if source == "s3" else (self._load_local(uri), "none")
        except AdapterError as e:
            metrics.FAILURES.labels(reason=e.reason).inc()
            raise
        metrics.LOADS.labels(source=source, cache=cache).inc()
        metrics.LOAD_SECONDS.labels(source=source, cache=cache).observe(time.perf_counter() - start)
        return weights

    def _load_local(self, uri: str) -> LoRAWeights:
        listing = self._local.stat(uri)
        check_files(uri, {name: f.size for name, f in listing.files.items()}, self.max_adapter_bytes)
        folder = local_path(uri)
        weights = self._read(uri, folder, hash_files(folder, ADAPTER_FILES))
        metrics.FETCHES.labels(source="local").inc()
        metrics.FETCHED_BYTES.labels(source="local").inc(sum(listing.files[n].size for n in ADAPTER_FILES))
        return weights

    def _load_s3(self, uri: str) -> tuple[LoRAWeights, str]:
        s3 = self._s3_source(uri)
        listing = s3.stat(uri)
        check_files(uri, {name: f.size for name, f in listing.files.items()}, self.max_adapter_bytes)
        entry = self.cache.get(uri, listing.version)
        if entry is not None:
            if entry.verify():
                metrics.CACHE_HITS.inc()
                return self._read(uri, entry.path, entry.sha256), "hit"
            self.cache.remove(entry.path)
            metrics.CACHE_CORRUPT.inc()
        metrics.CACHE_MISSES.inc()
        with self.cache.staging() as staged:
            s3.download(listing, staged, self._progress)
            metrics.FETCHES.labels(source="s3").inc()
            metrics.FETCHED_BYTES.labels(source="s3").inc(sum(listing.files[n].size for n in ADAPTER_FILES))
            sha = hash_files(staged, ADAPTER_FILES)
            # Validate before committing: a bad adapter never enters the cache.
            weights = self._read(uri, staged, sha)
            self.cache.commit(staged, uri, listing.version, sha)
        metrics.CACHE_BYTES.set(self.cache.size_bytes())
        return weights, "miss"

    def _read(self, uri: str, folder: pathlib.Path, sha: dict[str, str]) -> LoRAWeights:
        return read_adapter(uri, folder, self.base, max_rank=self.max_rank, max_bytes=self.max_adapter_bytes,
                            digest=content_digest(sha), allow_base_mismatch=self.allow_base_mismatch)

    def _source(self, uri: str) -> LocalSource | S3Source:
        return self._s3_source(uri) if is_s3(uri) else self._local

    def _s3_source(self, uri: str) -> S3Source:
        with self._s3_lock:
            if self._s3 is None:
                if self._s3_options is None:
                    raise StorageUnavailable(uri, "S3 is not configured for this store (s3=None)")
                self._s3 = S3Source(self._s3_options)
            return self._s3


class SingleFlight:
    """Concurrent calls with the same key run the function once and all get its result (or error)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, concurrent.futures.Future] = {}

    def run(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            future = self._calls.get(key)
            leader = future is None
            if leader:
                future = self._calls[key] = concurrent.futures.Future()
        if not leader:
            return future.result()
        try:
            result = fn()
        except BaseException as e:
            future.set_exception(e)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                del self._calls[key]
