"""The keys file: API key hashes and the tenant each belongs to (`lorafleet keys ...`).

A key is printed once when it is created; only its SHA-256 hash is stored.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.config import ConfigError
from router.auth import hash_api_key, new_api_key

DEFAULT_KEYS_FILE = "~/.config/lorafleet/keys.json"


def keys_path(path: str | None = None) -> Path:
    return Path(os.path.expanduser(path or os.environ.get("LORAFLEET_KEYS_FILE") or DEFAULT_KEYS_FILE))


def read_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["keys"]
        for e in entries:
            if not isinstance(e["hash"], str) or not isinstance(e["tenant"], str):
                raise TypeError("hash and tenant must be strings")
        return entries
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a lorafleet keys file ({exc})") from None


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    # Write a temporary file and rename it, so a crash never leaves half a keys file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": entries}, f, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_key(path: Path, tenant: str) -> str:
    """Create a key for `tenant`, store its hash, return the key (the only time it is seen)."""
    if not tenant:
        raise ValueError("tenant must not be empty")
    key = new_api_key()
    entries = read_entries(path)
    entries.append({"hash": hash_api_key(key), "tenant": tenant, "prefix": key[:7],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _write_entries(path, entries)
    return key


def revoke_keys(path: Path, prefix: str) -> int:
    """Remove the keys whose shown prefix is `prefix`; the number removed."""
    entries = read_entries(path)
    kept = [e for e in entries if e.get("prefix") != prefix]
    if len(kept) != len(entries):
        _write_entries(path, kept)
    return len(entries) - len(kept)


def key_hashes(keys_file: str | None) -> dict[str, str]:
    """hash -> tenant for auth.keys_file of the config; {} when no file is configured."""
    if keys_file is None:
        return {}
    path = keys_path(keys_file)
    if not path.exists():
        raise ConfigError(f"auth.keys_file: {path} does not exist (create keys with `lorafleet keys add`)")
    return {e["hash"]: e["tenant"] for e in read_entries(path)}
