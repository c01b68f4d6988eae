"""Typed adapter errors. Every message names the adapter, and where it applies the file, the key
and what was expected, so an operator can fix the adapter without reading code."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every storage error. `reason` is a short, bounded label (used in metrics)."""

    reason = "error"

    def __init__(
        self,
        adapter: str,
        problem: str,
        *,
        file: str | None = None,
        key: str | None = None,
        expected: object = None,
        got: object = None,
    ) -> None:
        self.adapter = adapter
        self.problem = problem
        self.file = file
        self.key = key
        self.expected = expected
        self.got = got
        where = f"adapter {adapter!r}"
        if file is not None:
            where += f", file {file!r}"
        if key is not None:
            where += f", key {key!r}"
        message = f"{where}: {problem}"
        if expected is not None:
            message += f" (expected {expected}"
            message += f", got {got})" if got is not None else ")"
        super().__init__(message)


class AdapterNotFound(AdapterError):
    """No adapter at the URI: missing folder, bucket or key."""

    reason = "not_found"


class AdapterValidationError(AdapterError):
    """The adapter's files do not form a valid LoRA adapter for this base model."""

    reason = "invalid"


class UnsupportedAdapter(AdapterValidationError):
    """A valid PEFT adapter that uses a feature lorafleet does not serve (DoRA, pickle, ...)."""

    reason = "unsupported"


class BaseModelMismatch(AdapterValidationError):
    """The adapter was trained on a different base model."""

    reason = "base_mismatch"


class AdapterTooLarge(AdapterValidationError):
    """The adapter's files exceed the configured size limit."""

    reason = "too_large"


class AccessDenied(AdapterError):
    """The store refused the credentials for this object."""

    reason = "access_denied"


class AdapterChanged(AdapterError):
    """The object changed between listing and download; retrying picks up the new version."""

    reason = "changed"


class StorageUnavailable(AdapterError):
    """The store could not be reached or kept failing after retries."""

    reason = "unavailable"
