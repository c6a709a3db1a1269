"""Metadata engines by URL scheme, as fsspec's known_implementations: a table of scheme ->
"module:Class" and an install hint, resolved with importlib when a URL is opened, so no
module imports the engines (and psycopg is imported only for a postgresql:// URL). A new
engine arrives with one register_engine call; it needs a classmethod from_url(url, create)."""
from __future__ import annotations

import importlib
import re
from typing import NamedTuple

from ...errors import ConfigError
from .interface import Meta


class Engine(NamedTuple):
    """Where an engine's class lives ("package.module:Class"), and what to say when its module
    cannot be imported because a dependency is missing ("" lets the ImportError through)."""

    target: str
    hint: str = ""


_PG_HINT = "postgresql:// metadata needs psycopg: pip install 'balefs[postgres]'"

#: URL scheme -> engine
ENGINES: dict[str, Engine] = {
    "sqlite": Engine("balefs.storage.meta.sqlite:SqliteMeta"),
    "postgresql": Engine("balefs.storage.meta.postgres:PostgresMeta", _PG_HINT),
    "postgres": Engine("balefs.storage.meta.postgres:PostgresMeta", _PG_HINT),
}


def register_engine(scheme: str, target: str, hint: str = "") -> None:
    """Make `scheme://` URLs open with the class at `target` ("package.module:Class")."""
    if ":" not in target:
        raise ValueError(f"engine target {target!r}: expected 'package.module:Class'")
    ENGINES[scheme] = Engine(target, hint)


def open_meta(url: str, create: bool = False) -> Meta:
    """Open the metadata store named by a URL: `sqlite:///path/to/volume.db` or
    `postgresql://user:password@host:port/database` (or a registered engine's scheme)."""
    scheme, sep, _ = url.partition("://")
    engine = ENGINES.get(scheme) if sep else None
    if engine is None:
        raise ConfigError(f"metadata URL {url!r}: use sqlite:///path or postgresql://user@host:port/database")
    return _engine_class(engine).from_url(url, create=create)


def _engine_class(engine: Engine) -> type:
    """Import an engine's class; a missing third-party dependency raises the engine's install hint."""
    module, _, name = engine.target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if not engine.hint or (exc.name or "").partition(".")[0] == "balefs":
            raise
        raise ImportError(engine.hint) from exc


def redact_url(url: str) -> str:
    """A metadata URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))
