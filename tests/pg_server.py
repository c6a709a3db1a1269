"""A throwaway PostgreSQL server for tests and benchmarks: `initdb` and `pg_ctl` in a
temporary directory, listening on a free loopback port with password (scram) auth.

As root (initdb refuses root) the server runs as the `postgres` system user of the
Debian package, or `nobody`. Every test gets its own schema, so volumes never meet.
Fixtures: `pg_server` (session), `pg_url` (a fresh, empty schema), `meta_engine`
(parametrized: "sqlite" or "postgresql", the `meta=` to pass to Client.init).

Without the server binaries the PostgreSQL tests skip, except in CI: where `required("PG")`
(BALEFS_REQUIRE_PG=1, which .ci/run exports, or CI set) they fail instead, so a CI run
cannot pass with none of them run (helpers.skip_or_fail, which the FUSE tests use too).
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from typing import Iterator

import pytest

from helpers import free_port, skip_or_fail

PASSWORD_USER = "bale"


def find_pg_bin() -> str | None:
    """The directory of initdb/pg_ctl: the newest /usr/lib/postgresql/*/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    which = shutil.which("pg_ctl")
    return os.path.dirname(os.path.realpath(which)) if which else None


class PgServer:
    """One PostgreSQL server in a temp dir; start(), stop(), restart(), urls for fresh schemas."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bin = find_pg_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
        self.root = tempfile.mkdtemp(prefix="balefs-pg-")
        self.data, self.log = os.path.join(self.root, "data"), os.path.join(self.root, "server.log")
        self.port = free_port()
        self.password = secrets.token_hex(8)
        self.settings = {"listen_addresses": "127.0.0.1", "unix_socket_directories": self.root, "max_connections": "200",
                         "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", **(settings or {})}
        self._user = None
        if os.getuid() == 0:
            self._user = "postgres" if has_user("postgres") else "nobody"
            pw = pwd.getpwnam(self._user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._schemas = itertools.count()
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w") as f:
            f.write(self.password)
        if self._user:
            os.chown(pwfile, pwd.getpwnam(self._user).pw_uid, -1)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync")
        self.start()
        self.sql(f"CREATE ROLE {PASSWORD_USER} LOGIN SUPERUSER PASSWORD '{self.password}'")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bin, tool), *args]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        # the sanitizer job (tox -e sanitize) preloads libasan for balefs' native code: not PostgreSQL's
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root, env=env)
        if check and r.returncode != 0:
            raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stderr or r.stdout}\n{self.log_tail()}")
        return r

    def log_tail(self) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return ""

    def start(self) -> None:
        opts = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", f"-p {self.port} {opts}", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def sql(self, statement: str) -> None:
        """Run one statement as the superuser over the unix socket."""
        import psycopg

        with psycopg.connect(host=self.root, port=self.port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute(statement)

    def url(self, schema: str | None = None, password: str | None = None, port: int | None = None) -> str:
        """A postgresql:// URL over TCP with the password; `schema` becomes the search path."""
        pw = self.password if password is None else password
        url = f"postgresql://{PASSWORD_USER}:{pw}@127.0.0.1:{port or self.port}/postgres"
        return url + (f"?options=-csearch_path%3D{schema}" if schema else "")

    def fresh_url(self) -> str:
        """The URL of a new, empty schema."""
        name = f"t{os.getpid()}_{next(self._schemas)}"
        self.sql(f"CREATE SCHEMA {name}")
        return self.url(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session, always stopped at the end."""
    try:
        server = PgServer()
    except FileNotFoundError as exc:
        skip_or_fail("PG", str(exc))
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A postgresql:// URL of a fresh, empty schema."""
    return pg_server.fresh_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def meta_engine(request: pytest.FixtureRequest) -> str:
    """The `meta` URL for Client.init: "" (the SQLite default) or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("pg_server").fresh_url()
