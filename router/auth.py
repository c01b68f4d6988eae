"""API keys and tenants: keys are stored only as SHA-256 hashes; tenants name the adapters
they may use by id or glob pattern."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KEY_PREFIX = "lf-"


def new_api_key() -> str:
    """A fresh random API key (shown to its owner once, never stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...] = ()  # adapter ids or glob patterns
    admin: bool = False

    def may_use(self, adapter_id: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter_id, pattern) for pattern in self.adapters)


# The caller when auth is off: every adapter, no admin API.
ANONYMOUS = Tenant(name="anonymous", adapters=("*",))


class KeyRing:
    """Maps a presented key to its tenant by comparing hashes."""

    def __init__(self, tenants: Iterable[Tenant], key_hashes: Mapping[str, str], *, required: bool = True):
        self._tenants = {t.name: t for t in tenants}
        unknown = sorted(set(key_hashes.values()) - set(self._tenants))
        if unknown:
            raise ValueError(f"keys name tenants that are not configured: {unknown}")
        self._key_hashes = dict(key_hashes)  # hash -> tenant name
        self.required = required

    def tenant_for(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer <key>` header, or None when it is missing or bad."""
        if not self.required:
            return ANONYMOUS
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = hash_api_key(authorization.removeprefix("Bearer ").strip())
        for stored, tenant in self._key_hashes.items():
            if hmac.compare_digest(stored, presented):
                return self._tenants[tenant]
        return None
