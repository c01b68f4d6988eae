"""storage/ against a real S3-compatible server (moto on 127.0.0.1): fetch, the bad-input matrix
with an empty cache afterwards, store faults, the disk cache (LRU by size, crash mid-write,
verification, single flight), metrics and the `adapters` CLI."""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import botocore.awsrequest
import pytest
import torch
from prometheus_client import REGISTRY
from s3_server import KEYS, REGION, moto_auth_enforced, s3_client, s3_endpoint
from test_storage import (
    ALL_MODULES,
    BAD_CASES,
    CONFIG,
    WEIGHTS,
    BadCase,
    PeftAdapter,
    base,
    base_dir,
    good_adapter,
    make_adapter,
    make_bad,
)

import storage
from storage import AdapterStore, BaseModelSpec, S3Options
from storage.cli import add_commands

__all__ = ["base", "base_dir", "good_adapter", "s3_endpoint"]  # fixtures used here


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def options(endpoint: str, **kwargs: object) -> S3Options:
    return S3Options(endpoint_url=endpoint, region=REGION, access_key_id=KEYS["aws_access_key_id"],
                     secret_access_key=KEYS["aws_secret_access_key"], **kwargs)


def upload_raw(endpoint: str, folder: pathlib.Path, uri: str) -> None:
    """Put a folder's files as they are (no validation), like a tenant's own upload tool would."""
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    for path in folder.iterdir():
        s3_client(endpoint).upload_file(str(path), bucket, f"{prefix}/{path.name}")


def cache_is_empty(store: AdapterStore) -> bool:
    return store.cache.entry_count() == 0 and not any((store.cache.root / "tmp").iterdir())


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_same(a: storage.LoRAWeights, b: storage.LoRAWeights) -> None:
    assert (a.rank, a.scaling, a.modules, a.digest) == (b.rank, b.scaling, b.modules, b.digest)
    for m in a.modules:
        assert torch.equal(a.lora_a[m], b.lora_a[m]) and torch.equal(a.lora_b[m], b.lora_b[m])


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=4, targets=["q_proj", "k_proj"]), dict(r=16, targets=ALL_MODULES, rslora=True)],
    ids=["r4-qk", "r16-all-rslora"],
)
def test_fetch_validate_and_cache(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str, bucket: str,
                                  kwargs: dict) -> None:
    made = make_adapter(tmp_path / "made", **kwargs)
    uri = f"s3://{bucket}/tenant-a/support-bot"
    upload_raw(s3_endpoint, made.path, uri)
    local = AdapterStore(base, cache_dir=tmp_path / "c0").load(str(made.path))
    misses, hits = metric("lorafleet_storage_cache_misses_total"), metric("lorafleet_storage_cache_hits_total")
    fetched = metric("lorafleet_storage_fetched_bytes_total", source="s3")

    cold = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint)).load(uri)
    assert (cold.uri, cold.name) == (uri, "support-bot")
    assert_same(cold, local)
    assert cold.scaling == pytest.approx(made.scaling)
    for (module, layer), (a, b) in made.weights.items():
        assert torch.equal(cold.lora_a[module][layer], a) and torch.equal(cold.lora_b[module][layer], b)
    assert metric("lorafleet_storage_cache_misses_total") == misses + 1
    sizes = sum((made.path / f).stat().st_size for f in (CONFIG, WEIGHTS))
    assert metric("lorafleet_storage_fetched_bytes_total", source="s3") == fetched + sizes

    # a new store (another replica process) on the same cache folder: no download
    warm = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint)).load(uri)
    assert_same(warm, local)
    assert metric("lorafleet_storage_cache_hits_total") == hits + 1
    assert metric("lorafleet_storage_fetched_bytes_total", source="s3") == fetched + sizes

    # a new version of the object is a new cache entry
    upload_raw(s3_endpoint, make_adapter(tmp_path / "v2", seed=7, **kwargs).path, uri)
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint))
    assert store.load(uri).digest != local.digest
    assert store.cache.entry_count() == 2


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_s3_adapter_leaves_cache_empty(tmp_path: pathlib.Path, base: BaseModelSpec, good_adapter: PeftAdapter,
                                           s3_endpoint: str, bucket: str, case: BadCase) -> None:
    uri = f"s3://{bucket}/bad/{case.id}"
    upload_raw(s3_endpoint, make_bad(case, good_adapter, tmp_path / "bad"), uri)
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint), **dict(case.store_kwargs))
    failures = metric("lorafleet_storage_failures_total", reason=case.error.reason)
    with pytest.raises(case.error) as info:
        store.load(uri)
    for fragment in (uri, *case.says):
        assert fragment in str(info.value), (fragment, str(info.value))
    assert cache_is_empty(store)
    assert metric("lorafleet_storage_failures_total", reason=case.error.reason) == failures + 1


def test_missing_bucket_key_and_prefix(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str,
                                       bucket: str, good_adapter: PeftAdapter) -> None:
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint))
    with pytest.raises(storage.AdapterNotFound, match="no such bucket"):
        store.load("s3://no-such-bucket-xyz/a/b")
    with pytest.raises(storage.AdapterNotFound, match="no objects under this prefix"):
        store.load(f"s3://{bucket}/nothing/here")
    with pytest.raises(storage.AdapterNotFound, match="malformed"):
        store.load(f"s3://{bucket}")
    with pytest.raises(storage.AdapterNotFound, match="no such bucket"):
        store.list("s3://no-such-bucket-xyz/")
    with pytest.raises(storage.StorageUnavailable, match="not configured"):
        AdapterStore(base, cache_dir=tmp_path / "c2", s3=None).load(f"s3://{bucket}/x")
    assert cache_is_empty(store)


def test_endpoint_down_fails_fast(tmp_path: pathlib.Path, base: BaseModelSpec) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(f"http://127.0.0.1:{port}"))
    start = time.perf_counter()
    with pytest.raises(storage.StorageUnavailable, match="unreachable"):
        store.load("s3://bucket/some/adapter")
    assert time.perf_counter() - start < 10
    assert cache_is_empty(store)


def test_access_denied(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str, bucket: str,
                       good_adapter: PeftAdapter) -> None:
    uri = f"s3://{bucket}/private/a"
    upload_raw(s3_endpoint, good_adapter.path, uri)
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name=REGION, **KEYS)
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]  # a user with no policy: may do nothing
    store = AdapterStore(base, cache_dir=tmp_path / "cache",
                         s3=S3Options(endpoint_url=s3_endpoint, region=REGION, access_key_id=key["AccessKeyId"],
                                      secret_access_key=key["SecretAccessKey"]))
    with moto_auth_enforced(s3_endpoint), pytest.raises(storage.AccessDenied, match="access denied") as info:
        store.load(uri)
    assert uri in str(info.value)
    assert cache_is_empty(store)


def test_object_changed_between_list_and_get(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str,
                                             bucket: str) -> None:
    one = make_adapter(tmp_path / "one", r=4, targets=["q_proj"], seed=1)
    two = make_adapter(tmp_path / "two", r=4, targets=["q_proj"], seed=2)
    uri = f"s3://{bucket}/racy/a"
    upload_raw(s3_endpoint, one.path, uri)
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint))
    client = store._s3_source(uri).client
    overwritten = []

    def overwrite_once(**_: object) -> None:  # a tenant re-uploads right after our listing
        if not overwritten:
            overwritten.append(True)
            upload_raw(s3_endpoint, two.path, uri)

    client.meta.events.register("before-call.s3.GetObject", overwrite_once)
    with pytest.raises(storage.AdapterChanged, match="changed while being fetched"):
        store.load(uri)
    assert cache_is_empty(store)
    # retrying picks up the new version
    reference = AdapterStore(base, cache_dir=tmp_path / "c2").load(str(two.path))
    assert_same(store.load(uri), reference)


def _fail_first(n: int, status: int = 503):
    """A botocore before-send hook answering the first n GetObject calls with a server error."""
    calls = []

    def hook(request: botocore.awsrequest.AWSPreparedRequest, **_: object):
        calls.append(request.url)
        if len(calls) <= n:
            return botocore.awsrequest.AWSResponse(request.url, status, {}, raw=_EmptyRaw())
        return None
    return hook, calls


class _EmptyRaw:
    def stream(self, *_: object, **__: object):
        yield b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"


def test_transient_faults_are_retried(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str, bucket: str,
                                      good_adapter: PeftAdapter) -> None:
    uri = f"s3://{bucket}/flaky/a"
    upload_raw(s3_endpoint, good_adapter.path, uri)
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint, max_attempts=3))
    hook, calls = _fail_first(2)
    store._s3_source(uri).client.meta.events.register("before-send.s3.GetObject", hook)
    w = store.load(uri)
    assert w.modules == ("q_proj", "v_proj", "down_proj")
    assert len(calls) == 2 + 2  # two refused tries of the first file, then both files

    store = AdapterStore(base, cache_dir=tmp_path / "cache2", s3=options(s3_endpoint, max_attempts=3))
    hook, calls = _fail_first(100)
    store._s3_source(uri).client.meta.events.register("before-send.s3.GetObject", hook)
    with pytest.raises(storage.StorageUnavailable, match="SlowDown"):
        store.load(uri)
    assert len(calls) == 3
    assert cache_is_empty(store)


def test_cache_evicts_least_recently_used(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str,
                                          bucket: str) -> None:
    made = make_adapter(tmp_path / "a", r=8, targets=ALL_MODULES)
    size = sum(p.stat().st_size for p in made.path.iterdir() if p.name in (CONFIG, WEIGHTS))
    uris = [f"s3://{bucket}/lru/{n}" for n in "abc"]
    for uri in uris:
        upload_raw(s3_endpoint, made.path, uri)
    store = AdapterStore(base, cache_dir=tmp_path / "cache", cache_max_bytes=int(2.5 * size),
                         s3=options(s3_endpoint))
    a, b, c = uris
    store.load(a)
    time.sleep(0.01)
    store.load(b)
    time.sleep(0.01)
    AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint)).load(a)  # hit: a is now newest
    time.sleep(0.01)
    evictions = metric("lorafleet_storage_cache_evictions_total")
    store.load(c)
    assert store.cache.entry_count() == 2
    assert store.cache.size_bytes() <= 2.5 * size
    assert metric("lorafleet_storage_cache_evictions_total") == evictions + 1
    misses = metric("lorafleet_storage_cache_misses_total")
    store.load(a)
    store.load(c)
    assert metric("lorafleet_storage_cache_misses_total") == misses  # a and c stayed
    store.load(b)
    assert metric("lorafleet_storage_cache_misses_total") == misses + 1  # b was evicted


def test_corrupt_cache_entry_is_refetched(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str,
                                          bucket: str, good_adapter: PeftAdapter) -> None:
    uri = f"s3://{bucket}/bitrot/a"
    upload_raw(s3_endpoint, good_adapter.path, uri)
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint))
    first = store.load(uri)
    (entry,) = (store.cache.root / "entries").iterdir()
    data = bytearray((entry / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data: still parses, wrong values
    (entry / WEIGHTS).write_bytes(bytes(data))
    misses = metric("lorafleet_storage_cache_misses_total")
    assert_same(store.load(uri), first)
    assert metric("lorafleet_storage_cache_misses_total") == misses + 1


WRITER = textwrap.dedent("""
    import pathlib, sys, time
    from storage import AdapterStore, BaseModelSpec, S3Options
    base_dir, cache_dir, uri, endpoint, marker = sys.argv[1:]

    def progress(name, total):
        def done(n):
            if name == "adapter_model.safetensors":
                pathlib.Path(marker).touch()  # part of the weights is on disk: wait to be killed
                time.sleep(60)
        return done

    opts = S3Options(endpoint_url=endpoint, region="us-east-1", access_key_id="testing", secret_access_key="testing")
    AdapterStore(BaseModelSpec.from_pretrained(base_dir), cache_dir=cache_dir, s3=opts, progress=progress).load(uri)
""")


def test_writer_killed_mid_write_leaves_no_entry(tmp_path: pathlib.Path, base_dir: pathlib.Path,
                                                 base: BaseModelSpec, s3_endpoint: str, bucket: str) -> None:
    made = make_adapter(tmp_path / "a", r=16, targets=ALL_MODULES)
    uri = f"s3://{bucket}/crash/a"
    upload_raw(s3_endpoint, made.path, uri)
    cache_dir, marker = tmp_path / "cache", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(storage.__file__).parents[1])}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(base_dir), str(cache_dir), uri, s3_endpoint,
                               str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert writer.poll() is None, "writer exited early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (staged,) = (cache_dir / "tmp").iterdir()
        assert (staged / WEIGHTS).exists()  # it was mid-write
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    store = AdapterStore(base, cache_dir=cache_dir, s3=options(s3_endpoint))
    assert cache_is_empty(store)  # no entry; the dead writer's temp folder was removed
    misses = metric("lorafleet_storage_cache_misses_total")
    assert_same(store.load(uri), AdapterStore(base, cache_dir=tmp_path / "c2").load(str(made.path)))
    assert metric("lorafleet_storage_cache_misses_total") == misses + 1


def test_two_threads_one_download(tmp_path: pathlib.Path, base: BaseModelSpec, s3_endpoint: str, bucket: str,
                                  good_adapter: PeftAdapter) -> None:
    uri = f"s3://{bucket}/popular/a"
    upload_raw(s3_endpoint, good_adapter.path, uri)
    store = AdapterStore(base, cache_dir=tmp_path / "cache", s3=options(s3_endpoint))
    gets = []

    def slow_get(**_: object) -> None:  # keep the first download in flight while the second thread asks
        gets.append(threading.current_thread().name)
        time.sleep(0.3)

    store._s3_source(uri).client.meta.events.register("before-call.s3.GetObject", slow_get)
    results: list[storage.LoRAWeights] = []
    threads = [threading.Thread(target=lambda: results.append(store.load(uri))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] is results[1]
    assert len(gets) == 2  # config + weights, once
    assert len(set(gets)) == 1


def test_metric_labels_are_bounded() -> None:
    for family in REGISTRY.collect():
        if family.name.startswith("lorafleet_storage"):
            for sample in family.samples:
                assert set(sample.labels) <= {"source", "cache", "reason", "le"}, sample


# ---- CLI ----


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_validate_push_ls(tmp_path: pathlib.Path, base_dir: pathlib.Path, s3_endpoint: str, bucket: str,
                              good_adapter: PeftAdapter, capsys: pytest.CaptureFixture,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["aws_secret_access_key"])
    s3 = ("--endpoint-url", s3_endpoint, "--region", REGION)
    assert cli("adapters", "validate", str(good_adapter.path), "--base", str(base_dir)) == 0
    out = capsys.readouterr().out
    assert "rank 4" in out and "q_proj,v_proj,down_proj" in out and "3 layers" in out

    for name in ("t1/a", "t1/b", "t2/c"):
        assert cli("adapters", "push", str(good_adapter.path), f"s3://{bucket}/{name}", *s3) == 0
    assert cli("adapters", "push", str(good_adapter.path), f"s3://{bucket}/t1/d", "--base", str(base_dir), *s3) == 0
    capsys.readouterr()
    assert cli("adapters", "ls", f"s3://{bucket}/t1/", *s3) == 0
    assert capsys.readouterr().out.split() == [f"s3://{bucket}/t1/{n}" for n in "abd"]
    assert cli("adapters", "validate", f"s3://{bucket}/t2/c", "--base", str(base_dir),
               "--cache-dir", str(tmp_path / "cache"), *s3) == 0
    assert "rank 4" in capsys.readouterr().out

    # push validates first: a bad adapter is refused and nothing is uploaded
    nan = next(c for c in BAD_CASES if c.id == "nan")
    bad = make_bad(nan, good_adapter, tmp_path / "bad")
    assert cli("adapters", "push", str(bad), f"s3://{bucket}/t3/bad", *s3) == 1
    assert "NaN" in capsys.readouterr().err
    assert cli("adapters", "ls", f"s3://{bucket}/t3/", *s3) == 0
    assert capsys.readouterr().out == ""
    assert cli("adapters", "validate", str(tmp_path / "missing"), "--base", str(base_dir)) == 1
    assert "no such folder" in capsys.readouterr().err
    assert cli("adapters", "push", str(good_adapter.path), "/tmp/not-s3", *s3) == 1
    assert "s3://" in capsys.readouterr().err
    shutil.rmtree(bad)
