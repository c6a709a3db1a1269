"""In transit: an encrypted volume refuses to move its bytes or metadata over an unencrypted link.

An S3 node reached over plain `http://` (its endpoints) and a PostgreSQL store reached over TCP
without `sslmode=require`, `verify-ca` or `verify-full` are refused on an encrypted volume,
unless the host's config says `insecure_transport = true` (`balefs init --insecure-transport`).
Local directories, memory nodes, SQLite files and PostgreSQL over a Unix socket stay on the host.
"""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from ..errors import ConfigError

TLS_MODES = ("require", "verify-ca", "verify-full")


def plaintext_links(nodes: list[str], meta_url: str) -> list[str]:
    """One line per link of the volume that would carry data unencrypted."""
    found = []
    for url in nodes:
        if url.startswith("s3://"):
            query = parse_qs(urlparse(url).query)
            for endpoint in ",".join(query.get("endpoint", [])).split(","):
                if endpoint.strip().startswith("http://"):
                    found.append(f"node {url.partition('?')[0]} is reached over plain HTTP ({endpoint.strip()})")
    if meta_url.startswith(("postgresql://", "postgres://")):
        parsed = urlparse(meta_url)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        host = query.get("host", parsed.hostname or "")
        if not host.startswith("/") and query.get("sslmode") not in TLS_MODES:
            found.append(f"the PostgreSQL metadata at {parsed.hostname}:{parsed.port or 5432} is reached without TLS "
                         "(add sslmode=verify-full to its URL)")
    return found


def refuse_plaintext(volume: str, nodes: list[str], meta_url: str) -> None:
    """ConfigError naming the first unencrypted link of an encrypted volume."""
    links = plaintext_links(nodes, meta_url)
    if links:
        raise ConfigError(f"volume {volume!r} is encrypted and {links[0]}"
                          + (f" (and {len(links) - 1} more)" if len(links) > 1 else "")
                          + "; use TLS, or pass --insecure-transport to `balefs init` (insecure_transport = true in its config)")
