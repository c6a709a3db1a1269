"""S3Node: blocks as objects in an S3-compatible bucket (AWS S3, Ceph RGW, MinIO), over many paths.

URL: ``s3://BUCKET/PREFIX?endpoint=http://a:9000,http://b:9000`` — each endpoint is one
path (NodePath) to the same bucket; without ``endpoint`` the AWS default endpoint is used.
Other query options: ``region`` (default us-east-1 or $AWS_REGION), ``connect_timeout`` and
``read_timeout`` (seconds, default 2 and 20), ``pool`` (connections per path, default 64),
``attempts`` (tries per request over all paths, default 6), ``ca_bundle`` (a PEM file of the CA
certificates an ``https://`` endpoint's certificate is verified against; default: the system's,
or $AWS_CA_BUNDLE). Certificates are always verified; one that does not verify is a NodeError
naming the node, not retried. Credentials come from the usual AWS places (environment
variables, ~/.aws profiles, instance roles).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlparse

from ..errors import BlockNotFoundError, ConfigError, NodeError
from .paths import FATAL, PATH_DOWN, SERVER, THROTTLED, NodePath, PathPolicy, PathSet
from .node import VOLUME_KEY

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "RequestThrottled", "TooManyRequestsException", "ProvisionedThroughputExceededException"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed"}
_OPTIONS = {"endpoint", "region", "connect_timeout", "read_timeout", "pool", "attempts", "ca_bundle"}
CAPACITY = 1 << 50  # an object store reports no capacity: 1 PiB total and free
_SESSION = None
_SESSION_LOCK = threading.Lock()


def _session_unlocked():
    """One boto3 session for every S3 node of the process (call with _SESSION_LOCK held): clients
    made from it share its loaded service models, so opening many nodes is quick."""
    global _SESSION
    import boto3

    if _SESSION is None:
        _SESSION = boto3.session.Session()
    return _SESSION


def parse_s3_url(url: str) -> tuple[str, str, list[str], dict[str, str]]:
    """Split an s3:// node URL into (bucket, prefix, endpoints, other options)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"node {url!r}: expected s3://BUCKET/PREFIX[?endpoint=URL,URL]")
    query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
    unknown = set(query) - _OPTIONS
    if unknown:
        raise ConfigError(f"node {url!r}: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_OPTIONS))})")
    endpoints = [e.strip().rstrip("/") for e in query.pop("endpoint", "").split(",") if e.strip()]
    for e in endpoints:
        if urlparse(e).scheme not in ("http", "https") or not urlparse(e).netloc:
            raise ConfigError(f"node {url!r}: endpoint {e!r} must be an http:// or https:// URL")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"node {url!r}: an endpoint is listed twice")
    for key in ("connect_timeout", "read_timeout", "pool", "attempts"):
        if key in query:
            try:
                if float(query[key]) <= 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"node {url!r}: {key} must be a positive number, not {query[key]!r}") from None
    if "ca_bundle" in query:
        query["ca_bundle"] = os.path.abspath(os.path.expanduser(query["ca_bundle"]))
        if not os.path.isfile(query["ca_bundle"]):
            raise ConfigError(f"node {url!r}: ca_bundle {query['ca_bundle']} is not a file (a PEM file of CA certificates)")
    return parsed.netloc, parsed.path.strip("/"), endpoints, query


def normalize_s3_url(url: str) -> str:
    """The canonical form of an s3:// node URL (checked; options in a fixed order)."""
    bucket, prefix, endpoints, opts = parse_s3_url(url)
    query = "&".join([f"endpoint={','.join(endpoints)}"] * bool(endpoints) + [f"{k}={opts[k]}" for k in sorted(opts)])
    return f"s3://{bucket}/{prefix}" + (f"?{query}" if query else "")


def _code_status(exc) -> tuple[str, int]:
    """The error code and HTTP status of a botocore ClientError."""
    return (str(exc.response.get("Error", {}).get("Code", "")),
            int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))


def classify_s3_error(exc: BaseException) -> str:
    """How PathSet treats a failed S3 request: fatal, throttled, path down or server error."""
    from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError,
                                     ResponseStreamingError, SSLError)

    if isinstance(exc, SSLError):
        return FATAL  # a certificate that does not verify will not verify on a retry
    if isinstance(exc, ClientError):
        code, status = _code_status(exc)
        if code in _THROTTLE_CODES or status in (429, 503):
            return THROTTLED
        return SERVER if status >= 500 else FATAL
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return FATAL
    if isinstance(exc, ResponseStreamingError):
        return SERVER  # a body cut short: retried; the path goes down only if it keeps happening
    if isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError)):
        return PATH_DOWN  # cannot connect, timed out, connection dropped mid-body
    try:
        import urllib3.exceptions
        if isinstance(exc, urllib3.exceptions.HTTPError):
            return PATH_DOWN
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        pass
    return FATAL


class S3Node:
    """A bucket/prefix on an S3-compatible store, reached over one or more endpoints (paths)."""

    def __init__(self, url: str) -> None:
        from botocore.config import Config

        self.url = normalize_s3_url(url)
        self.bucket, self.prefix, endpoints, opts = parse_s3_url(self.url)
        self.label = f"s3://{self.bucket}/{self.prefix}"
        region = opts.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(
            max_pool_connections=int(float(opts.get("pool", 64))),
            connect_timeout=float(opts.get("connect_timeout", 2)),
            read_timeout=float(opts.get("read_timeout", 20)),
            retries={"total_max_attempts": 1},  # PathSet retries: on another path, with backoff on throttling
            s3={"addressing_style": "path"} if endpoints else {},
            request_checksum_calculation="when_required",  # blocks carry their own xxh3 checksum
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        with _SESSION_LOCK:  # a session is not thread-safe; its clients are
            session = _session_unlocked()
            verify = opts.get("ca_bundle") or None  # None: botocore's default ($AWS_CA_BUNDLE, else certifi's)
            paths = [NodePath(ep or "aws", session.client("s3", endpoint_url=ep, region_name=region, config=config,
                                                          verify=verify))
                     for ep in (endpoints or [None])]
        policy = PathPolicy(attempts=int(float(opts.get("attempts", 6))))
        self.paths = PathSet(self.label, paths, classify_s3_error, self._probe, policy)

    # -- plumbing ------------------------------------------------------------------------

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _run(self, what: str, key: str, fn: Callable[[Any], Any], size_in=lambda r: 0, size_out: int = 0) -> Any:
        """Run one request over the paths; turn store errors into NodeErrors naming the node."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError, SSLError

        try:
            return self.paths.call(fn, size_in, size_out)
        except ClientError as exc:
            raise self._error(exc, what, key) from None
        except SSLError as exc:
            raise NodeError(f"node {self.label}: TLS with {exc.kwargs.get('endpoint_url', 'its endpoint')} failed, "
                            f"the server's certificate does not verify ({exc.kwargs.get('error', exc)}); name the CA "
                            "that issued it with the node option ca_bundle=PATH (or $AWS_CA_BUNDLE)") from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise NodeError(f"node {self.label}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from None

    def _error(self, exc, what: str, key: str) -> NodeError:
        code, status = _code_status(exc)
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code == "NoSuchBucket" or (what == "check" and status == 404):
            return NodeError(f"node {self.label}: bucket {self.bucket!r} does not exist (create it, or fix the node URL)")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return BlockNotFoundError(f"node {self.label}: block {key} is missing")
        if code in _CREDENTIAL_CODES or status == 403:
            return NodeError(f"node {self.label}: the store rejected the credentials ({code or status}: {message}); "
                             "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        return NodeError(f"node {self.label}: {what} {key} failed ({code or status}: {message})")

    def _probe(self, path: NodePath) -> None:
        path.target.head_bucket(Bucket=self.bucket)

    # -- the Node interface --------------------------------------------------------------

    def check(self, writable: bool = True) -> None:
        """Raise NodeError if the bucket is missing, the credentials are rejected or no path answers."""
        self._run("check", "", lambda c: c.head_bucket(Bucket=self.bucket))
        if writable:
            probe = self._object(f".balefs-probe-{os.getpid()}-{threading.get_ident()}")
            self._run("write probe", probe, lambda c: c.put_object(Bucket=self.bucket, Key=probe, Body=b"ok"))
            self._run("delete probe", probe, lambda c: c.delete_object(Bucket=self.bucket, Key=probe))

    def put(self, key: str, data: bytes) -> None:
        body = bytes(data) if not isinstance(data, bytes) else data
        name = self._object(key)
        self._run("put", key, lambda c: c.put_object(Bucket=self.bucket, Key=name, Body=body), size_out=len(body))

    def get(self, key: str) -> bytes:
        name = self._object(key)
        return self._run("get", key, lambda c: c.get_object(Bucket=self.bucket, Key=name)["Body"].read(), len)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        name, rng = self._object(key), f"bytes={start}-{end - 1}"
        return self._run("get", key, lambda c: c.get_object(Bucket=self.bucket, Key=name, Range=rng)["Body"].read(), len)

    def delete(self, key: str) -> None:
        name = self._object(key)
        self._run("delete", key, lambda c: c.delete_object(Bucket=self.bucket, Key=name))

    def list(self) -> Iterator[tuple[str, int]]:
        prefix = self._object("")
        token: str | None = None
        while True:
            args = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self._run("list", prefix, lambda c: c.list_objects_v2(**args))
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix):]
                if "/" not in name and not name.startswith(".balefs-probe") and name != VOLUME_KEY:
                    yield name, int(obj["Size"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def capacity(self) -> tuple[int, int]:
        return CAPACITY, CAPACITY

    # -- health --------------------------------------------------------------------------

    def is_up(self) -> bool:
        """Whether at least one path to the node is up."""
        return self.paths.is_up()

    def probe_paths(self) -> None:
        """Probe every path now, so that path_stats shows fresh state and latency."""
        self.paths.probe_all()

    def path_stats(self) -> list[dict[str, Any]]:
        """The figures of every path, for `balefs status`."""
        return self.paths.stats()

    def close(self) -> None:
        self.paths.close()
