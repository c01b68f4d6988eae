"""Where adapters live: a local folder (path or file://) or an S3-compatible bucket (s3://).

A source lists one adapter's files (names, sizes, versions), downloads them into a folder,
lists adapters under a prefix and uploads a folder. Errors come out typed (storage.errors)."""

from __future__ import annotations

import contextlib
import functools
import pathlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import boto3

from storage.errors import (
    AccessDenied,
    AdapterChanged,
    AdapterNotFound,
    StorageUnavailable,
)
from storage.peft_format import CONFIG_FILE, WEIGHTS_FILE

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
CHUNK = 8 << 20

# Called with a file name and its total size; returns a callback taking bytes done since last call.
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store. Unset fields fall back to boto3's standard chain
    (environment, ~/.aws/config, instance role), AWS_ENDPOINT_URL included."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    # An unreachable endpoint must fail in seconds, not minutes: short connect timeout, few attempts.
    connect_timeout: float = 2.0
    read_timeout: float = 20.0
    # botocore's "standard" retry mode: exponential backoff with jitter on throttling, 5xx and
    # connection errors; max_attempts counts the first try.
    max_attempts: int = 3
    addressing_style: str = "auto"


@dataclass(frozen=True)
class RemoteFile:
    size: int
    version: str  # ETag (S3) or mtime_ns (local)


@dataclass(frozen=True)
class Listing:
    """One adapter's files as listed, before any download."""

    uri: str
    files: dict[str, RemoteFile]

    @property
    def version(self) -> str:
        return ";".join(f"{name}={self.files[name].version}" for name in ADAPTER_FILES if name in self.files)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> pathlib.Path:
    return pathlib.Path(urlparse(uri).path if uri.startswith("file://") else uri)


class LocalSource:
    """Adapters in a local folder tree; read in place (no copy into the cache)."""

    def stat(self, uri: str) -> Listing:
        folder = local_path(uri)
        if not folder.is_dir():
            raise AdapterNotFound(uri, "no such folder", expected="a PEFT adapter folder")
        files = {}
        for p in folder.iterdir():
            if p.is_file():
                st = p.stat()
                files[p.name] = RemoteFile(st.st_size, str(st.st_mtime_ns))
        if not files:
            raise AdapterNotFound(uri, "empty folder", expected="adapter_config.json + adapter_model.safetensors")
        return Listing(uri, files)

    def list(self, uri_prefix: str) -> list[str]:
        root = local_path(uri_prefix)
        if not root.is_dir():
            raise AdapterNotFound(uri_prefix, "no such folder")
        return sorted(str(p.parent) for p in root.rglob(CONFIG_FILE))


class S3Source:
    """Adapters under s3://bucket/prefix/, one adapter per "folder"."""

    def __init__(self, options: S3Options) -> None:
        import botocore.config  # boto3 is needed only for s3:// sources (a GPU image may lack it)

        config = botocore.config.Config(
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            retries={"total_max_attempts": options.max_attempts, "mode": "standard"},
            s3={"addressing_style": options.addressing_style},
        )
        self.client = _s3_client(
            endpoint_url=options.endpoint_url,
            region_name=options.region,
            aws_access_key_id=options.access_key_id,
            aws_secret_access_key=options.secret_access_key,
            aws_session_token=options.session_token,
            config=config,
        )

    def stat(self, uri: str) -> Listing:
        bucket, prefix = split_s3(uri)
        files = {}
        with s3_errors(uri):
            resp = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/", Delimiter="/")
        for obj in resp.get("Contents", []):
            files[obj["Key"][len(prefix) + 1 :]] = RemoteFile(obj["Size"], obj["ETag"])
        if not files:
            raise AdapterNotFound(uri, "no objects under this prefix", expected=f"s3://{bucket}/{prefix}/{CONFIG_FILE}")
        return Listing(uri, files)

    def download(self, listing: Listing, dest: pathlib.Path, progress: Progress | None = None) -> None:
        """Download the adapter's files as listed; If-Match makes a concurrent overwrite an error."""
        bucket, prefix = split_s3(listing.uri)
        for name in ADAPTER_FILES:
            expected = listing.files[name]
            done = progress(name, expected.size) if progress else None
            with s3_errors(listing.uri, name):
                resp = self.client.get_object(Bucket=bucket, Key=f"{prefix}/{name}", IfMatch=expected.version)
                with open(dest / name, "wb") as f:
                    for chunk in resp["Body"].iter_chunks(CHUNK):
                        f.write(chunk)
                        if done:
                            done(len(chunk))
            if (dest / name).stat().st_size != expected.size:
                raise AdapterChanged(listing.uri, "size differs from the listing", file=name,
                                     expected=expected.size, got=(dest / name).stat().st_size)

    def list(self, uri_prefix: str) -> list[str]:
        bucket, prefix = split_s3(uri_prefix, allow_empty_key=True)
        found = []
        with s3_errors(uri_prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/" + CONFIG_FILE):
                        found.append(f"s3://{bucket}/{key[: -len(CONFIG_FILE) - 1]}")
        return sorted(found)

    def upload(self, folder: pathlib.Path, uri: str, progress: Progress | None = None) -> None:
        """Upload the weights first and the config last, so a lister never sees a config without weights."""
        bucket, prefix = split_s3(uri)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            path = folder / name
            done = progress(name, path.stat().st_size) if progress else None
            with s3_errors(uri, name):
                self.client.upload_file(str(path), bucket, f"{prefix}/{name}", Callback=done)


_session_lock = threading.Lock()


@functools.cache
def _boto_session() -> boto3.session.Session:
    import boto3

    return boto3.session.Session()


def _s3_client(**kwargs: object):
    """Clients come from one boto3 session per process: it caches the parsed service models, so a
    client costs ~20 ms, not ~300 ms. Creating clients from one session is not thread-safe."""
    with _session_lock:
        return _boto_session().client("s3", **kwargs)


def split_s3(uri: str, *, allow_empty_key: bool = False) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.strip("/")
    if parsed.scheme != "s3" or not bucket or not (key or allow_empty_key):
        raise AdapterNotFound(uri, "malformed S3 URI", expected="s3://bucket/prefix/name")
    return bucket, key


_NOT_FOUND = {"NoSuchBucket": "no such bucket", "NoSuchKey": "no such key", "404": "no such key"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_CHANGED = {"PreconditionFailed", "412"}


@contextlib.contextmanager
def s3_errors(uri: str, file: str | None = None) -> Iterator[None]:
    """Translate botocore's exceptions (after its own retries) into storage errors."""
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        message = e.response.get("Error", {}).get("Message", "")
        if code in _NOT_FOUND:
            raise AdapterNotFound(uri, f"{_NOT_FOUND[code]}: {message}", file=file) from None
        if code in _DENIED:
            raise AccessDenied(uri, f"access denied by the store ({code}): {message}", file=file) from None
        if code in _CHANGED:
            raise AdapterChanged(uri, "object changed while being fetched; retry to load the new version",
                                 file=file) from None
        raise StorageUnavailable(uri, f"S3 error {code}: {message}", file=file) from None
    except botocore.exceptions.NoCredentialsError:
        raise AccessDenied(uri, "no AWS credentials found (environment, config file or S3Options)",
                           file=file) from None
    except botocore.exceptions.BotoCoreError as e:
        raise StorageUnavailable(uri, f"store unreachable: {e}", file=file) from None
