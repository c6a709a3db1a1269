"""Helpers for the remote-node tests: a moto S3 server on loopback, fault proxies, the testbed."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # benchmarks.testbed lives beside the package, not in it

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket with a fresh name on the S3 server at `endpoint`; return its name."""
    import boto3

    name = name or f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def s3_url(bucket: str, endpoints: list[str], prefix: str = "blocks", **options: object) -> str:
    query = "&".join([f"endpoint={','.join(endpoints)}"] + [f"{k}={v}" for k, v in options.items()])
    return f"s3://{bucket}/{prefix}?{query}"


def set_credentials() -> None:
    for k, v in CREDENTIALS.items():
        os.environ[k] = v


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server on loopback for the importing test module; its endpoint URL."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    set_credentials()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
