"""Random sequences of namespace operations (write, mkdir, rename, remove, copy) checked against a
small in-memory model of POSIX rename(2)/unlink/mkdir semantics: same errors, same tree, same bytes."""
from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balefs.storage.client import Client

from helpers import BLOCK


class Model:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = set()

    def kind(self, p: str) -> str | None:
        if p == "" or p in self.dirs:
            return "d"
        return "f" if p in self.files else None

    def ancestors(self, p: str) -> list[str]:
        parts = p.split("/")
        return ["/".join(parts[:i]) for i in range(1, len(parts))]

    def check_ancestors(self, p: str, create: bool) -> int | None:
        for anc in self.ancestors(p):
            k = self.kind(anc)
            if k == "f":
                return errno.ENOTDIR
            if k is None and not create:
                return errno.ENOENT
        return None

    def make_parents(self, p: str) -> None:
        self.dirs.update(self.ancestors(p))

    def below(self, p: str) -> list[str]:
        return [q for q in itertools.chain(self.files, self.dirs) if q.startswith(p + "/")]

    # -- operations: return an errno, or None when the operation succeeds ----------------

    def write(self, p: str, data: bytes) -> int | None:
        if (e := self.check_ancestors(p, create=True)) is not None:
            return e
        if self.kind(p) == "d":
            return errno.EISDIR
        self.make_parents(p)
        self.files[p] = data
        return None

    def mkdir(self, p: str) -> int | None:
        if (e := self.check_ancestors(p, create=True)) is not None:
            return e
        if self.kind(p) == "f":
            return errno.EEXIST
        self.make_parents(p)
        self.dirs.add(p)
        return None

    def remove(self, p: str) -> int | None:
        if (e := self.check_ancestors(p, create=False)) is not None:
            return e
        if self.kind(p) is None:
            return errno.ENOENT
        for q in [p, *self.below(p)]:
            self.files.pop(q, None)
            self.dirs.discard(q)
        return None

    def rename(self, src: str, dst: str) -> int | None:
        if (e := self.check_ancestors(src, create=False)) is not None:
            return e
        sk = self.kind(src)
        if sk is None:
            return errno.ENOENT
        if (e := self.check_ancestors(dst, create=True)) is not None:
            return e
        if sk == "d" and dst.startswith(src + "/"):
            return errno.EINVAL
        dk = self.kind(dst)
        if dk is not None:
            if src == dst:
                return None
            if dk == "d":
                if sk != "d":
                    return errno.EISDIR
                if self.below(dst):
                    return errno.ENOTEMPTY
                self.dirs.discard(dst)
            elif sk == "d":
                return errno.ENOTDIR
            else:
                del self.files[dst]
        self.make_parents(dst)
        for q in [src, *self.below(src)]:
            new = dst + q[len(src):]
            if q in self.files:
                self.files[new] = self.files.pop(q)
            else:
                self.dirs.discard(q)
                self.dirs.add(new)
        return None

    def copy(self, src: str, dst: str) -> int | None:
        if (e := self.check_ancestors(src, create=False)) is not None:
            return e
        sk = self.kind(src)
        if sk is None:
            return errno.ENOENT
        if sk == "d":
            return errno.EISDIR
        return self.write(dst, self.files[src])


names = st.sampled_from(["a", "b", "c"])
paths = st.lists(names, min_size=1, max_size=3).map("/".join)
datas = st.one_of(st.binary(max_size=300), st.integers(0, 3).map(lambda i: bytes([i]) * (BLOCK + 10)))
ops = st.one_of(
    st.tuples(st.just("write"), paths, datas),
    st.tuples(st.just("mkdir"), paths),
    st.tuples(st.just("remove"), paths),
    st.tuples(st.just("rename"), paths, paths),
    st.tuples(st.just("copy"), paths, paths),
)

_examples = itertools.count()


@pytest.fixture
def client(make_volume, open_client, meta_engine) -> Client:
    """The model is checked against each metadata engine (SQLite, a real PostgreSQL)."""
    make_volume(meta=meta_engine)
    return open_client("vol")


def test_namespace_matches_model(client: Client) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(ops, min_size=1, max_size=14))
    def run(steps) -> None:
        root = f"ex{next(_examples)}"
        client.mkdir(root)
        model = Model()
        for step in steps:
            op, *args = step
            want = getattr(model, op)(*args)
            vargs = [f"{root}/{a}" if isinstance(a, str) else a for a in args]
            try:
                if op == "write":
                    client.write_file(*vargs)
                elif op == "mkdir":
                    client.mkdir(vargs[0], parents=True, exist_ok=True)
                elif op == "remove":
                    client.remove(vargs[0], recursive=True)
                elif op == "rename":
                    client.rename(*vargs)
                else:
                    client.copy(*vargs)
                got = None
            except OSError as exc:
                got = exc.errno
            assert got == want, (step, errno.errorcode.get(got), errno.errorcode.get(want))
        tree = {p[len(root) + 1:]: n.kind for p, n in client.walk(root)}
        assert tree == {**{d: "d" for d in model.dirs}, **{f: "f" for f in model.files}}
        names_ = sorted(model.files)
        assert client.read_ranges([(f"{root}/{p}", 0, None) for p in names_]) == [model.files[p] for p in names_]
        for p in names_:
            assert client.stat(f"{root}/{p}").size == len(model.files[p])

    run()
    u = client.usage(scan_nodes=False)
    # live bytes are the bytes that files' extents reference: exactly the sum of file sizes
    assert u["live_bytes"] == u["file_bytes"]
