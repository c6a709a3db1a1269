"""Layering: adapters (loaders, checkpoints) use only the storage client's public API, the
storage core knows nothing of any adapter, and no balefs module imports itself through others.
Checked on the source (AST), imports inside functions and TYPE_CHECKING blocks included, so a
lazy import cannot slip past."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "balefs"

# what an adapter may import from the storage core (balefs.errors is outside it)
ALLOWED_STORAGE = ("balefs.storage.client", "balefs.storage.config")
# attributes of a client that are its machinery, not its API (besides any _private name)
CLIENT_INTERNALS = {"reader", "codec", "writer", "meta", "cache", "disk_cache", "nodes", "placement"}
# packages and modules built on the storage core, which it must never import
ADAPTERS = ("balefs.fuse", "balefs.loaders", "balefs.checkpoint", "balefs.fs", "balefs.cli", "balefs.ingest_ray",
            "balefs.metrics")


def modules_under(*subpackages: str) -> list[Path]:
    """Every Python module below these subpackages of balefs."""
    return sorted(p for sub in subpackages for p in (PACKAGE / sub).rglob("*.py"))


def module_name(path: Path) -> str:
    """The dotted name of a module file of balefs."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    """The dotted name of the package a module file of balefs belongs to (itself, for __init__)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def import_statements(source: str, package: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names taken from it) of every import in a module of `package`,
    wherever it sits (in functions too); names is empty for a plain `import module`."""
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, module, [alias.name for alias in node.names if alias.name != "*"]))
    return out


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of `package`; `from pkg import
    name` yields pkg and pkg.name, since name may be a module."""
    return [(line, m) for line, module, names in import_statements(source, package)
            for m in [module] + [f"{module}.{n}" for n in names]]


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def storage_imports_refused(source: str, package: str) -> list[str]:
    """Modules of the storage core, other than the client and config, that a module imports."""
    return [f"line {line}: {module}" for line, module in imports_in(source, package)
            if within(module, ("balefs.storage",)) and module != "balefs.storage"
            and not within(module, ALLOWED_STORAGE)]


def client_internals_used(source: str) -> list[str]:
    """Attribute accesses that reach into a client's machinery or private state; a client is
    any name or attribute ending in 'client' (client, self.client, self._client...)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
        if not name.lower().endswith("client"):
            continue
        private = node.attr.startswith("_") and not (node.attr.startswith("__") and node.attr.endswith("__"))
        if private or node.attr in CLIENT_INTERNALS:
            out.append(f"line {node.lineno}: {ast.unparse(node)}")
    return out


def import_graph() -> dict[str, set[str]]:
    """Each balefs module -> the balefs modules it imports, anywhere in it (`from pkg import mod`
    is an import of pkg.mod, not of pkg; a package's __init__ run first is not counted)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = graph.setdefault(name, set())
        for _, module, names in import_statements(path.read_text(), package_of(path)):
            subs = {f"{module}.{n}" for n in names} & files.keys()
            deps.update(subs or ({module} & files.keys()))
        deps.discard(name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another, directly or not (Tarjan's SCCs of two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# Cycles that other parts of issue 13 remove (meta and node: engines and node kinds by registry);
# empty this once they are merged.
KNOWN_CYCLES: list[list[str]] = []


# the metrics exporter keeps the adapters' rule: it reads a client through its public API only
ADAPTER_MODULES = modules_under("loaders", "checkpoint", "metrics")


@pytest.mark.parametrize("path", ADAPTER_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_adapters_import_only_the_client_and_config_from_storage(path: Path) -> None:
    assert storage_imports_refused(path.read_text(), package_of(path)) == []


@pytest.mark.parametrize("path", ADAPTER_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_adapters_use_no_internals_of_a_client(path: Path) -> None:
    assert client_internals_used(path.read_text()) == []


def test_storage_core_imports_no_adapter() -> None:
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
             for path in modules_under("storage") for line, module in imports_in(path.read_text(), package_of(path))
             if within(module, ADAPTERS)]
    assert found == []


def test_no_import_cycle_in_balefs() -> None:
    assert [c for c in import_cycles(import_graph()) if c not in KNOWN_CYCLES] == []


def test_the_checks_find_each_kind_of_breach() -> None:
    """The checkers themselves, on a made-up loader module: lazy and absolute imports included."""
    source = ("from ..storage.client import Client, Extent\n"
              "from ..storage import config\n"
              "from ..storage.snapshot import open_snapshot\n"
              "from ..errors import NodeError\n"
              "def f(self, client):\n"
              "    from balefs.storage import reader\n"
              "    import balefs.storage.meta\n"
              "    client.reader.read_many([])\n"
              "    self._client._local_copy, self.client.cfg, client.read_extents, client.__class__\n"
              "    return client.codec\n")
    assert storage_imports_refused(source, "balefs.loaders") == [
        "line 3: balefs.storage.snapshot", "line 3: balefs.storage.snapshot.open_snapshot",
        "line 6: balefs.storage.reader", "line 7: balefs.storage.meta"]
    assert sorted(client_internals_used(source)) == [
        "line 10: client.codec", "line 8: client.reader", "line 9: self._client._local_copy"]
    assert [m for _, m in imports_in("from ..cli import main\n", "balefs.storage") if within(m, ADAPTERS)] == \
        ["balefs.cli", "balefs.cli.main"]
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
