"""Node kinds by URL scheme: canonical URLs, unsupported schemes, and kinds registered from outside
(imported only when a node of theirs is opened; a missing dependency is a one-line install hint)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from balefs.errors import ConfigError
from balefs.storage import node_registry
from balefs.storage.localnode import LocalNode
from balefs.storage.memorynode import MemoryNode
from balefs.storage.node_registry import normalize_node_url, open_node, register_node_kind


@pytest.fixture
def kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kinds registered by a test are gone after it."""
    monkeypatch.setattr(node_registry, "_KINDS", dict(node_registry._KINDS))


@pytest.mark.parametrize("url,expected", [
    ("/data/n0", "/data/n0"),
    ("file:///data/n0", "/data/n0"),
    ("memory://x", "memory://x"),
])
def test_normalize_node_url(url: str, expected: str) -> None:
    assert normalize_node_url(url) == expected


def test_relative_node_path_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize_node_url("n0") == str(tmp_path / "n0")
    assert isinstance(open_node("n0"), LocalNode)
    assert isinstance(open_node("memory://abc"), MemoryNode)


def test_unsupported_node_scheme() -> None:
    with pytest.raises(ConfigError, match="ftp") as info:
        normalize_node_url("ftp://bucket/x")
    assert str(info.value) == ("node 'ftp://bucket/x': unsupported scheme 'ftp' "
                               "(use a directory, file://, s3:// or memory://)")
    with pytest.raises(ConfigError, match="unsupported scheme 'ftp'"):
        open_node("ftp://bucket/x")


def test_empty_file_url() -> None:
    with pytest.raises(ConfigError, match="empty path"):
        normalize_node_url("file://")


class Tagged(MemoryNode):
    """A node kind from outside the node modules (a memory node under its own scheme)."""


def tagged_url(url: str) -> str:
    return url.rstrip("/")


def test_a_kind_registered_from_outside_is_opened_by_its_scheme(kinds) -> None:
    register_node_kind("tagged", f"{__name__}:Tagged", normalize=f"{__name__}:tagged_url")
    assert normalize_node_url("tagged://a/") == "tagged://a"
    node = open_node("tagged://a/")
    assert type(node) is Tagged and node.url == "tagged://a"
    assert "tagged://" in str(pytest.raises(ConfigError, normalize_node_url, "ftp://x").value)


def test_a_scheme_is_not_taken_over_by_mistake(kinds) -> None:
    register_node_kind("memory", "balefs.storage.memorynode:MemoryNode")  # the same again: fine
    with pytest.raises(ValueError, match="already served by balefs.storage.memorynode:MemoryNode"):
        register_node_kind("memory", f"{__name__}:Tagged")
    register_node_kind("memory", f"{__name__}:Tagged", replace=True)
    assert type(open_node("memory://x")) is Tagged


def test_a_kind_whose_dependency_is_missing_says_what_to_install(kinds) -> None:
    register_node_kind("gone", "balefs_no_such_module:GoneNode", install_hint="gone nodes need gonelib (pip install gonelib)")
    with pytest.raises(ConfigError) as info:
        open_node("gone://x")
    assert str(info.value) == "node gone://x: gone nodes need gonelib (pip install gonelib): No module named 'balefs_no_such_module'"
    register_node_kind("bare", "balefs_no_such_module:BareNode")  # no hint: the import error itself
    with pytest.raises(ModuleNotFoundError):
        open_node("bare://x")


def test_s3_without_its_module_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "balefs.storage.s3node", None)  # as if it could not be imported
    monkeypatch.setattr(node_registry, "normalize_node_url", lambda url: url)
    with pytest.raises(ConfigError) as info:
        open_node("s3://bkt/p")
    assert str(info.value).startswith("node s3://bkt/p: S3 nodes need boto3 (pip install 'balefs[s3]'): ")
    assert "\n" not in str(info.value)


def test_opening_a_node_imports_only_its_kind() -> None:
    """The node interface imports no kind: S3 support (and boto3) loads only for an s3:// node."""
    import subprocess

    code = ("import sys; from balefs.storage.node_registry import open_node; open_node('memory://x'); "
            "print(sorted(m for m in sys.modules if m.startswith(('balefs.storage.s3node', 'balefs.storage.localnode', 'boto'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
