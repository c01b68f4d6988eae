"""The adapter registry: adapter id -> (uri, revision), changed at runtime by the admin API.

Every registration takes a new revision from one counter, so a replaced adapter (or one
removed and added again) never shares its (name, uri, revision) residency key with the
weights it replaces; requests already running keep the revision they started with.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class AdapterEntry:
    id: str
    uri: str
    revision: int


class AdapterRegistry:
    def __init__(self, adapters: Mapping[str, str] | None = None):
        self._revisions = itertools.count()
        self._entries: dict[str, AdapterEntry] = {}
        for adapter_id, uri in (adapters or {}).items():
            self.register(adapter_id, uri)

    def register(self, adapter_id: str, uri: str) -> AdapterEntry:
        if not ADAPTER_ID.match(adapter_id):
            raise ValueError(
                f"id {adapter_id!r} must be 1-128 characters of letters, digits and ._:/- "
                "starting with a letter or digit"
            )
        if not uri:
            raise ValueError("uri must not be empty")
        entry = AdapterEntry(adapter_id, uri, next(self._revisions))
        self._entries[adapter_id] = entry
        return entry

    def remove(self, adapter_id: str) -> AdapterEntry | None:
        return self._entries.pop(adapter_id, None)

    def get(self, adapter_id: str) -> AdapterEntry | None:
        return self._entries.get(adapter_id)

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[AdapterEntry]:
        return [self._entries[i] for i in self.ids()]
