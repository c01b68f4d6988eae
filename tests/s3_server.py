"""A real S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1, a random port.

Use the `s3_endpoint` fixture (import it into the test module) or `moto_s3()` directly."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """Start a server; yields its endpoint URL; stops it on exit."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@functools.cache
def s3_client(endpoint: str):
    """An admin client of the test server (one per endpoint: creating clients is slow)."""
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION, **KEYS)


@contextlib.contextmanager
def moto_auth_enforced(endpoint: str) -> Iterator[None]:
    """Make the server check credentials and IAM policies (moto accepts anything by default)."""
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=5).raise_for_status()
