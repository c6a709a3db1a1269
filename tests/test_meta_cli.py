"""The balefs command on a PostgreSQL volume: init --meta postgresql://, put, ls, cat, mv, rm."""
from __future__ import annotations

from helpers import make_tree, run_cli, user_error


def test_cli_on_a_postgres_volume(pg_server, pg_url, node_dirs, tmp_path) -> None:
    files = make_tree(tmp_path / "src", 40, 10, 5000, fanout=2)
    nodes = node_dirs(2)
    r = run_cli("init", "shared", "--node", nodes[0], "--node", nodes[1], "--meta", pg_url)
    assert r.returncode == 0, r.stderr
    assert b"metadata postgresql://bale:***@" in r.stdout and pg_server.password.encode() not in r.stdout
    assert run_cli("init", "again", "--node", nodes[0], "--meta", pg_url).returncode == 1  # holds a volume already
    assert run_cli("put", tmp_path / "src", "bale://shared/x").returncode == 0
    assert run_cli("ls", "bale://shared/x").stdout == b"d00/\nd01/\n"
    some = sorted(files)[3]
    assert run_cli("cat", f"bale://shared/x/{some}").stdout == files[some]
    assert run_cli("mv", "bale://shared/x", "bale://shared/y").returncode == 0
    assert run_cli("rm", "-r", "bale://shared/y/d00").returncode == 0
    r = run_cli("df", "shared", "--no-scan")
    assert r.returncode == 0 and b"20 files" in r.stdout


def test_postgres_meta_without_psycopg_says_what_to_install(node_dirs, balefs_home) -> None:
    node = node_dirs(1)[0]
    line = user_error("init", "v", "--node", node, "--meta", "postgresql://bale@127.0.0.1:1/balefs", without="psycopg")
    assert "psycopg" in line and "pip install 'balefs[postgres]'" in line, line
    assert not (balefs_home / "v.toml").exists() and not any(node.iterdir())
