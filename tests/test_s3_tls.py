"""S3 nodes over HTTPS with certificate verification: a moto server with a certificate from a test
CA made here; an encrypted volume on it verifies against that CA (the node option ca_bundle)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from balefs.storage.client import Client
from balefs.storage.crypto import write_key_file

from helpers import run_cli, user_error
from remote_support import s3_url, set_credentials
from tls_support import TestCA, TlsMotoServer

SECRET = b"confidential weights " * 100


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory):
    """(the HTTPS endpoint, the CA that issued its certificate, another CA)."""
    pytest.importorskip("moto.server")
    set_credentials()
    d = tmp_path_factory.mktemp("tls")
    ca = TestCA(d, "balefs test CA")
    server = TlsMotoServer(*ca.issue(d))
    yield server.endpoint, ca, TestCA(d, "some other CA")
    server.stop()


def _bucket(endpoint: str, ca: Path) -> str:
    import uuid

    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", verify=str(ca)).create_bucket(Bucket=name)
    return name


def _key(tmp_path: Path) -> str:
    key = tmp_path / "vault.key"
    write_key_file(str(key))
    return str(key)


def test_encrypted_volume_on_an_https_node_verified_against_the_test_ca(tls_s3, tmp_path) -> None:
    endpoint, ca, _ = tls_s3
    bucket = _bucket(endpoint, ca.cert_path)
    node = s3_url(bucket, [endpoint], ca_bundle=ca.cert_path)
    r = run_cli("init", "vault", "--node", node, "--encrypt", "--key-file", _key(tmp_path))  # no --insecure-transport
    assert r.returncode == 0, r.stderr.decode()
    src = tmp_path / "src.bin"
    src.write_bytes(SECRET)
    r = run_cli("put", src, "bale://vault/models/w.bin")
    assert r.returncode == 0, r.stderr.decode()
    assert run_cli("cat", "bale://vault/models/w.bin").stdout == SECRET
    with Client.open("vault") as c:
        c.write_file("models/b", b"more")
        assert c.read_file("models/b") == b"more" and c.read_file("models/w.bin") == SECRET
        node_obj = next(iter(c.nodes.values()))
        blobs = [node_obj.get(k) for k, _ in node_obj.list()]
    assert blobs and not any(b"confidential" in b for b in blobs)  # on the wire and in the bucket: ciphertext


def test_a_certificate_from_another_ca_is_a_clear_error_naming_the_node(tls_s3, tmp_path) -> None:
    endpoint, ca, other = tls_s3
    bucket = _bucket(endpoint, ca.cert_path)
    key = _key(tmp_path)
    for node in (s3_url(bucket, [endpoint], ca_bundle=other.cert_path), s3_url(bucket, [endpoint])):
        line = user_error("init", "wrongca", "--node", node, "--encrypt", "--key-file", key)
        assert f"node s3://{bucket}/blocks" in line and "certificate" in line and "ca_bundle" in line, line
    assert not (Path(os.environ["BALEFS_HOME"]) / "wrongca.toml").exists()
    line = user_error("init", "noca", "--node", s3_url(bucket, [endpoint], ca_bundle=tmp_path / "nope.pem"))
    assert "ca_bundle" in line and "nope.pem" in line


def test_plain_http_is_still_refused_without_insecure_transport(tls_s3, tmp_path) -> None:
    endpoint, ca, _ = tls_s3
    bucket = _bucket(endpoint, ca.cert_path)
    plain = s3_url(bucket, [endpoint.replace("https://", "http://")], ca_bundle=ca.cert_path)
    line = user_error("init", "plain", "--node", plain, "--encrypt", "--key-file", _key(tmp_path))
    assert "plain HTTP" in line and "--insecure-transport" in line
