"""Disk cache of fetched adapter files, keyed by URI and object version, bounded in bytes (LRU).

An entry is a folder `entries/<key>/` holding the adapter's files and `meta.json` (sizes and
sha256 of each file). It is built in `tmp/<pid>-<random>/` and renamed into place in one step,
so a writer that dies leaves no entry (only a temp folder, removed by the next cache on the same
host that finds its process gone). Readers verify the hashes; a bad entry is dropped and fetched again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from storage import metrics

META_FILE = "meta.json"


@dataclass(frozen=True)
class CacheEntry:
    path: pathlib.Path
    sha256: dict[str, str]  # file name -> hex digest, as written

    def verify(self) -> bool:
        """Re-hash the files; False if any is missing or differs from what was written."""
        try:
            return all(sha256_file(self.path / name) == digest for name, digest in self.sha256.items())
        except FileNotFoundError:  # evicted by another process meanwhile
            return False


class DiskCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        self.root = pathlib.Path(root)
        self.max_bytes = max_bytes
        self._entries = self.root / "entries"
        self._tmp = self.root / "tmp"
        self._entries.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._remove_orphans()

    def get(self, uri: str, version: str) -> CacheEntry | None:
        """The entry for this URI and version, or None. Marks it most recently used."""
        path = self._entries / _key(uri, version)
        try:
            meta = json.loads((path / META_FILE).read_text())
            os.utime(path / META_FILE)  # LRU order is meta.json's mtime
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return CacheEntry(path, meta["sha256"])

    @contextlib.contextmanager
    def staging(self) -> Iterator[pathlib.Path]:
        """A fresh temp folder to download into; removed on exit unless committed."""
        path = self._temp_name()
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, staged: pathlib.Path, uri: str, version: str, sha: dict[str, str]) -> CacheEntry:
        """Write meta.json (the staged files' sha256), rename the folder into place, then evict."""
        (staged / META_FILE).write_text(json.dumps({"uri": uri, "version": version, "sha256": sha}))
        path = self._entries / _key(uri, version)
        with contextlib.suppress(OSError):  # another process committed the same entry first
            staged.rename(path)
        self.evict()
        return CacheEntry(path, sha)

    def remove(self, path: pathlib.Path) -> None:
        # Rename first so that no reader ever opens a half-deleted entry.
        trash = self._temp_name()
        with contextlib.suppress(FileNotFoundError):
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def evict(self) -> int:
        """Drop least recently used entries until the total is within max_bytes; returns how many."""
        with self._lock:
            entries = []
            for path in self._entries.iterdir():
                try:
                    used = (path / META_FILE).stat().st_mtime_ns
                    size = sum(p.stat().st_size for p in path.iterdir())
                except FileNotFoundError:
                    continue
                entries.append((used, size, path))
            entries.sort()
            total = sum(size for _, size, _ in entries)
            evicted = 0
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                self.remove(path)
                metrics.CACHE_EVICTIONS.inc()
                total -= size
                evicted += 1
            return evicted

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._entries.glob("*/*"))

    def entry_count(self) -> int:
        return sum(1 for _ in self._entries.iterdir())

    def _temp_name(self) -> pathlib.Path:
        # host and pid say whose it is: the cache folder may be shared by several hosts (a volume)
        return self._tmp / f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"

    def _remove_orphans(self) -> None:
        """Temp folders of this host's processes that no longer exist (a writer killed mid-download)."""
        for path in self._tmp.iterdir():
            host, pid, _ = path.name.rsplit(".", 2) if path.name.count(".") >= 2 else ("", "", "")
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def hash_files(folder: pathlib.Path, names: tuple[str, ...]) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in names}


def sha256_file(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _key(uri: str, version: str) -> str:
    return hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:32]


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
