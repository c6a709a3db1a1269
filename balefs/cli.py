"""The `balefs` command: create volumes and move files in and out of them."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import stat as stat_mod
import sys
import tempfile
import time
from typing import Callable

import click
from tqdm import tqdm

from .storage.config import parse_bale_url, parse_rate, parse_size
from .errors import BaleError
from .storage.client import Client
from .storage.crypto import PASSPHRASE_ENV, MasterSource, PassphraseRequired, write_key_file
from .storage.gc import DEFAULT_MIN_BLOCK_FILL, collect_garbage
from .storage.ingest import ingest_local, walk_local
from .storage.meta.registry import redact_url
from .storage.meta.types import Inode, mode_bits, split_path
from .storage.native import engine_name


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# The extra of pyproject.toml that installs each optional dependency (by top-level module).
_EXTRA_OF = {"ray": "ray", "psycopg": "postgres", "psycopg_pool": "postgres", "boto3": "s3", "botocore": "s3",
             "mfusepy": "fuse", "fuse": "fuse", "torch": "torch", "torchdata": "torch", "nvidia": "dali",
             "pyarrow": "arrow", "pandas": "arrow", "zarr": "checkpoint"}


def _missing_dependency(exc: ImportError) -> str | None:
    """What to say for an optional dependency that is not installed: the error and the extra
    that installs it. None when the import that failed is balefs's own (a bug: let it show)."""
    name = None
    e: BaseException | None = exc
    while e is not None and name is None:
        name = getattr(e, "name", None)
        e = e.__cause__ or e.__context__
    top = (name or "").partition(".")[0]
    if top == "balefs":
        return None
    msg = str(exc)
    if "pip install" in msg:
        return msg
    extra = _EXTRA_OF.get(top)
    if extra:
        return f"{msg}: install it with pip install 'balefs[{extra}]'"
    return f"{msg} (an optional dependency: pip install 'balefs[all]' installs every one)"


def _during_interrupt(exc: BaseException) -> bool:
    """Whether `exc` was raised while a KeyboardInterrupt was being handled."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__context__
    return False


def user_errors(fn: Callable) -> Callable:
    """Turn user mistakes into one clear line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                try:
                    return fn(*args, **kwargs)
                except PassphraseRequired as exc:
                    if not sys.stdin.isatty():
                        raise
                    os.environ[exc.env] = click.prompt("passphrase", hide_input=True, err=True)
                    return fn(*args, **kwargs)  # nothing was written before the key was needed
            except Exception as exc:
                if _during_interrupt(exc):  # cleanup that failed while a Ctrl-C unwound the command
                    raise KeyboardInterrupt from exc
                raise
        except BrokenPipeError:
            # The reader of our output went away (`balefs ls | head`): not an error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except KeyboardInterrupt:
            click.echo("balefs: interrupted; files committed before the interrupt are intact", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            # a bad value found once the command runs (a malformed URL, a node that is not the
            # volume's): one line, like every other user error, not click's usage block
            click.echo(f"balefs: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except ImportError as exc:
            msg = _missing_dependency(exc)
            if msg is None:
                raise
            click.echo(f"balefs: error: {msg}", err=True)
            sys.exit(1)
        except (BaleError, OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.filename and exc.strerror:
                msg = f"{exc.filename}: {exc.strerror}"
            else:
                msg = str(exc)
            click.echo(f"balefs: error: {msg}", err=True)
            sys.exit(1)

    return wrapper


def metrics_option(fn: Callable) -> Callable:
    """--metrics HOST:PORT: serve this command's Prometheus metrics while it runs (balefs.metrics)."""
    return click.option("--metrics", "metrics_at", default=None, metavar="HOST:PORT",
                        help="Serve Prometheus metrics at HOST:PORT while this runs (port 0: a free one, said on "
                             "stderr; a host other than 127.0.0.1 only when named). Default: off, or BALEFS_METRICS.")(fn)


def _expose_metrics(where: str | None) -> bool:
    """Open this command's metrics endpoint (before any work: a port in use is one error line); whether one is open."""
    if not where and not os.environ.get("BALEFS_METRICS"):
        return False
    from . import metrics

    ep = metrics.serve(where) if where else metrics.serve_from_env()  # (which logs where it serves)
    if where:
        click.echo(f"metrics at {ep.url}", err=True)
    return ep is not None


def _watch_metrics(exposed: bool, client: Client, volume: str) -> None:
    if exposed:
        from . import metrics

        metrics.watch(client, volume, figures=True)


def parse_url(url: str) -> tuple[str, str]:
    """Split `bale://VOLUME/path` (or `VOLUME/path`) into (volume, path); a usage error if malformed."""
    try:
        return parse_bale_url(url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


class _Volume(click.ParamType):
    """A VOLUME argument: the volume's name, or its URL bale://NAME (not a path inside it)."""

    name = "volume"

    def convert(self, value: str, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not _is_bale(value):
            return value
        try:
            volume, path = parse_bale_url(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if path:
            self.fail(f"{value!r}: expected a volume, NAME or bale://NAME, not a path inside one", param, ctx)
        return volume


VOLUME = _Volume()


def _is_bale(url: str) -> bool:
    return url.startswith("bale://")


class _Commands(click.Group):
    """The `balefs` group: an option or argument with a bad value (`--replicas two`) is one
    `balefs: error:` line; only a command of the wrong shape (a missing argument, an unknown
    option) gets click's usage block."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.BadParameter as exc:
            if isinstance(exc, click.MissingParameter):
                raise
            click.echo(f"balefs: error: {exc.format_message()}", err=True)
            ctx.exit(exc.exit_code)


def _mount_sessions() -> str:
    """Which mount sessions this build has (`mount --session`): for --version and status."""
    if importlib.util.find_spec("balefs._fusenative") is None:
        return "python (the native session is not built)"
    return "native (the default), python"


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="balefs", message=f"%(prog)s, version %(version)s; mount sessions: {_mount_sessions()}; "
                                                     f"block engine: {engine_name()}")
def main() -> None:
    """balefs: many small files baled into large chunks, striped over storage nodes.

    Volumes are named in config files under $BALEFS_HOME (default ~/.config/balefs);
    files are addressed as bale://VOLUME/path.
    """


@main.command()
@click.argument("name", type=VOLUME)
@click.option("--node", "nodes", multiple=True, required=True,
              help="Storage node: an existing directory (one per disk), s3://BUCKET/PREFIX?endpoint=URL,URL "
                   "(credentials from the AWS environment or profile) or memory://name. Repeat for each node.")
@click.option("--meta", default="", help="Metadata store URL; default: an SQLite file beside the config.")
@click.option("--replicas", default=1, show_default=True, help="Copies of each block, on distinct nodes.")
@click.option("--ec", default="", metavar="K+M",
              help="Erasure code instead of replicas: stripes of K data and M parity blocks on K+M distinct "
                   "nodes (4+2 stores 1.5x the data and survives any 2 nodes lost). Needs Intel ISA-L (libisal2).")
@click.option("--write-quorum", default=0, show_default=True,
              help="Copies that must be stored before a block counts as durable (0: all --replicas); "
                   "with fewer, files stay readable from the copies that were stored. With --ec: blocks of a "
                   "stripe (K+1 to K+M; 0: all), the missing ones shown by df and rebuilt by fsck --repair.")
@click.option("--chunk-size", default="64MiB", show_default=True, help="Size of the chunks small files are packed into.")
@click.option("--block-size", default="4MiB", show_default=True, help="Unit of striping, caching and checksums.")
@click.option("--compression", type=click.Choice(["none", "lz4"]), default="none", show_default=True,
              help="Compress blocks with lz4 (kept only where it shrinks a block).")
@click.option("--cache-size", default="1GiB", show_default=True, help="Memory block cache per client.")
@click.option("--encrypt", is_flag=True, help="Seal every block with AES-256-GCM; needs --key-file, --key-env, --passphrase or --key-service.")
@click.option("--key-file", default="", help="The master key: a file of 32 random bytes, mode 0600 (`balefs key new PATH`).")
@click.option("--key-env", default="", help="The master key: this environment variable (32 bytes, hex or base64).")
@click.option("--passphrase", is_flag=True, help=f"The master key: a passphrase (scrypt), from ${PASSPHRASE_ENV} or a prompt.")
@click.option("--key-service", type=click.Choice(["pg"]), default=None,
              help="The master key: held by the PostgreSQL metadata (--meta postgresql://...), released only to a "
                   "role with a valid grant from a granted host; no key on any client's disk.")
@click.option("--key-domain", "key_domains", multiple=True, metavar="PATH",
              help="With --encrypt: give this path prefix a data key of its own (a grant on it releases only that "
                   "key; its files never share a chunk with others). Repeat for each.")
@click.option("--audit", is_flag=True, help="Record every namespace change in the append-only audit table (on with --encrypt).")
@click.option("--insecure-transport", is_flag=True, help="Let an encrypted volume use plain-HTTP S3 nodes or a non-TLS database.")
@user_errors
def init(name: str, nodes: tuple[str, ...], meta: str, replicas: int, ec: str, write_quorum: int, chunk_size: str,
         block_size: str, compression: str, cache_size: str, encrypt: bool, key_file: str, key_env: str,
         passphrase: bool, key_service: str | None, key_domains: tuple[str, ...], audit: bool,
         insecure_transport: bool) -> None:
    """Create volume NAME (or bale://NAME) over the given nodes."""
    if replicas < 1:
        raise click.BadParameter(f"must be 1 or more (copies of each block), not {replicas}", param_hint="--replicas")
    keys = _key_source_options(key_file, key_env, passphrase, "--", key_service or "")
    if encrypt and not keys:
        raise click.UsageError("--encrypt needs the master key: --key-file PATH, --key-env VAR, --passphrase or --key-service pg")
    if keys and not encrypt:
        raise click.UsageError("--key-file, --key-env, --passphrase and --key-service are for --encrypt")
    if key_domains and not encrypt:
        raise click.UsageError("--key-domain gives a path prefix a data key of its own: it needs --encrypt")
    if passphrase:
        _ask_passphrase(confirm=True)
    cfg = Client.init(name, nodes, meta=meta, replicas=replicas, write_quorum=write_quorum, chunk_size=parse_size(chunk_size, "--chunk-size"),
                      block_size=parse_size(block_size, "--block-size"), compression=compression,
                      cache_size=parse_size(cache_size, "--cache-size"), ec=ec, encrypt=encrypt, audit=audit,
                      insecure_transport=insecure_transport, key_domains=key_domains, **keys)
    redundancy = f"erasure code {cfg.ec}" if cfg.ec else f"replicas {cfg.replicas}"
    click.echo(f"created volume {name!r}: {len(cfg.nodes)} node(s), {redundancy}, "
               f"chunks {_human(cfg.chunk_size)}, blocks {_human(cfg.block_size)}, metadata {redact_url(cfg.meta_url)}"
               + (", encrypted (aes-256-gcm)" if encrypt else "")
               + (f", key domains {', '.join('/' + '/'.join(split_path(d)) for d in key_domains)}" if key_domains else ""))


def _key_source_options(key_file: str, key_env: str, passphrase: bool, prefix: str, key_service: str = "") -> dict[str, object]:
    """The config settings of one master key source given as options; a usage error for more than one."""
    given = {k: v for k, v in (("key_file", key_file), ("key_env", key_env), ("key_passphrase", passphrase),
                               ("key_service", key_service)) if v}
    if len(given) > 1:
        names = {"key_file": "key-file", "key_env": "key-env", "key_passphrase": "passphrase", "key_service": "key-service"}
        raise click.UsageError(" and ".join(f"{prefix}{names[k]}" for k in given) + ": name one master key source")
    return given


def _ask_passphrase(confirm: bool = False, env: str = "") -> None:
    """Put a passphrase in the environment variable the core reads it from, prompting if it is unset."""
    env = env or PASSPHRASE_ENV
    if not os.environ.get(env):
        os.environ[env] = click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm, err=True)


@main.group()
def key() -> None:
    """Master keys of encrypted volumes: make one, rotate a volume's."""


@key.command("new")
@click.argument("path")
@user_errors
def key_new(path: str) -> None:
    """Write a new random 32-byte master key to PATH (mode 0600; an existing file is refused)."""
    write_key_file(path)
    click.echo(f"wrote a new master key to {path} (mode 0600); keep a copy: without it the volume's data is lost")


@key.command("rotate")
@click.argument("volume", type=VOLUME)
@click.option("--new-key-file", default="", help="The new master key's file (32 bytes, mode 0600).")
@click.option("--new-key-env", default="", help="The new master key's environment variable.")
@click.option("--new-passphrase", is_flag=True, help=f"A new passphrase (from ${PASSPHRASE_ENV}_NEW or a prompt).")
@click.option("--new-key-service", type=click.Choice(["pg"]), default=None,
              help="A new master key made and kept by the PostgreSQL key service.")
@user_errors
def key_rotate(volume: str, new_key_file: str, new_key_env: str, new_passphrase: bool, new_key_service: str | None) -> None:
    """Wrap VOLUME's data keys with a new master key (seconds: no block is rewritten); this host's
    config then names the new key."""
    from dataclasses import replace as _replace

    from .storage.config import load_config, save_config
    from .storage.keys import rotate_master

    new = _key_source_options(new_key_file, new_key_env, new_passphrase, "--new-", new_key_service or "")
    if not new:
        raise click.UsageError("name the new master key: --new-key-file PATH, --new-key-env VAR, --new-passphrase "
                               "or --new-key-service pg")
    cfg = load_config(volume)
    new_cfg = _replace(cfg, **{"key_file": "", "key_env": "", "key_passphrase": False, "key_service": "", **new})
    if new_passphrase:
        _ask_passphrase(confirm=True, env=PASSPHRASE_ENV + "_NEW")
    new_source = new_cfg.master_source()
    if new_passphrase:  # the rewrap reads the new passphrase from its own variable
        new_source = MasterSource(passphrase=True, passphrase_env=PASSPHRASE_ENV + "_NEW")
    with Client.open(volume) as client:
        rotate_master(client.meta, cfg.master_source(), new_source, client.identity.volume_uuid)
    save_config(new_cfg, overwrite=True)
    click.echo(f"volume {volume!r}: data keys rewrapped with the new master key ({new_cfg.master_source().describe()}); "
               "no block was rewritten")


@main.command()
@click.argument("volume", type=VOLUME)
@click.argument("prefix")
@click.option("--to", "grantee", required=True, help="The OS user (or @group) the grant is for.")
@click.option("--read", "access", flag_value="read", help="Read access.")
@click.option("--read-write", "access", flag_value="read-write", help="Read and write access.")
@click.option("--hosts", default="", help="Hosts it holds on: names or CIDR blocks, comma-separated (default: any).")
@click.option("--until", default=None, help="End of validity, a UTC date or time (2027-03-01, 2027-03-01T12:00); default: none.")
@click.option("--password-env", default="",
              help="PostgreSQL metadata: set the grantee role's password from this variable (default: a new random "
                   "one, printed once).")
@user_errors
def grant(volume: str, prefix: str, grantee: str, access: str | None, hosts: str, until: str | None, password_env: str) -> None:
    """Grant a user (on PostgreSQL metadata: a database role) access to PREFIX (a path in VOLUME) from some hosts, until a date."""
    import secrets

    from .storage.grants import check_hosts, iso

    if access is None:
        raise click.UsageError("say --read or --read-write")
    until_ns = _parse_date(until, "--until") if until else 0
    if until_ns and until_ns <= time.time_ns():
        raise click.BadParameter(f"{until!r} is in the past", param_hint="--until")
    _, path = parse_url(prefix) if _is_bale(prefix) else ("", "/".join(split_path(prefix)))
    password = ""
    if password_env:
        password = os.environ.get(password_env, "")
        if not password:
            raise click.BadParameter(f"${password_env} is not set", param_hint="--password-env")
    with Client.open(volume) as client:
        role = client.meta.database_role() is not None
        if role and not password:
            password = secrets.token_urlsafe(18)
        gid = client.meta.add_grant(grantee, path, access, check_hosts(hosts), until_ns, password=password if role else "")
    click.echo(f"grant {gid}: {grantee} may {'read' if access == 'read' else 'read and write'} /{path} "
               f"from {hosts or 'any host'}" + (f" until {iso(until_ns)}" if until_ns else ""))
    if role:
        click.echo(f"PostgreSQL role {grantee}: LOGIN until the grant ends, row-level security on /{path}; "
                   + (f"password from ${password_env}" if password_env else f"password {password} (shown once)"))
        names = [h for h in check_hosts(hosts).split(",") if h and not _is_address(h)]
        if names:
            click.echo(f"note: the database sees client addresses only: host names ({', '.join(names)}) are checked by "
                       "balefs clients, not by the key service or row-level security; give addresses or CIDR blocks", err=True)


@main.command("grants")
@click.argument("volume", type=VOLUME)
@click.option("--all", "show_all", is_flag=True, help="Revoked and expired grants too.")
@user_errors
def grants_cmd(volume: str, show_all: bool) -> None:
    """List VOLUME's grants."""
    from .storage.grants import Grant, iso

    now = time.time_ns()
    with Client.open(volume) as client:
        rows = [Grant(*r) for r in client.meta.grants()]
    for g in rows:
        state = g.state(now)
        if state != "active" and not show_all:
            continue
        until = iso(g.valid_until_ns) if g.valid_until_ns else "-"
        click.echo(f"{g.id:>4}  {g.grantee:<12} {g.access:<10} /{g.prefix:<24} hosts={g.hosts or 'any':<20} "
                   f"until={until}  {state}" + (f" {iso(g.revoked_ns)}" if g.revoked_ns else ""))


@main.command()
@click.argument("volume", type=VOLUME)
@click.argument("grant_id", type=int)
@user_errors
def revoke(volume: str, grant_id: int) -> None:
    """Revoke grant GRANT_ID of VOLUME: new opens under it fail from now on (within 2 s on running clients)."""
    with Client.open(volume) as client:
        if not client.meta.revoke_grant(grant_id):
            raise click.BadParameter(f"volume {volume!r} has no active grant {grant_id} (see `balefs grants {volume}`)")
    click.echo(f"grant {grant_id} revoked")


def _is_address(host: str) -> bool:
    """Whether a grant's host is an address or CIDR block (what PostgreSQL can check), not a name."""
    import ipaddress

    try:
        ipaddress.ip_network(host, strict=False)
        return True
    except ValueError:
        return False


def _parse_date(text: str, hint: str) -> int:
    """A UTC date or time given as an option, in nanoseconds since the epoch."""
    import datetime

    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a date (2027-03-01) or a time (2027-03-01T12:00)", param_hint=hint) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp() * 1e9)


@main.command("audit")
@click.argument("volume", type=VOLUME)
@click.option("--since", default=None, help="Only rows since then: an age (90s, 30m, 1h, 7d) or a date (2026-03-01, 2026-03-01T12:00).")
@click.option("--path", "path", default="", help="Only rows about this path or what lies under it.")
@click.option("--denied", is_flag=True, help="Only refused accesses.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@user_errors
def audit_cmd(volume: str, since: str | None, path: str, denied: bool, as_json: bool) -> None:
    """Print VOLUME's audit trail: who changed what, from where, and what was refused."""
    import json as _json

    since_ns = _parse_since(since) if since else 0
    with Client.open(volume) as client:
        rows = client.audit_rows(since_ns, path, denied)
    for r in rows:
        if as_json:
            click.echo(_json.dumps({"id": r.id, "time": _iso(r.time_ns), "user": r.user, "host": r.host, "pid": r.pid,
                                    "op": r.op, "path": r.path, "outcome": r.outcome, "detail": r.detail}))
        else:
            click.echo(f"{_iso(r.time_ns)}  {r.user}@{r.host}[{r.pid}]  {r.op:<10} {r.outcome:<6} /{r.path}"
                       + (f"  ({r.detail})" if r.detail else ""))


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns // 1_000_000 % 1000:03d}Z"


def _parse_since(text: str) -> int:
    """--since as nanoseconds since the epoch: an age back from now, or a UTC date."""
    import datetime
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return time.time_ns() - int(seconds * 1e9)
    try:
        datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give an age (30m, 1h, 7d) or a date (2026-03-01)", param_hint="--since") from None
    return _parse_date(text, "--since")


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--drop-old", is_flag=True, help="At the end of a complete run, forget the old data keys (only when no "
                                               "client opened before the run still writes).")
@user_errors
def rekey(volume: str, drop_old: bool) -> None:
    """Seal every block of VOLUME again under a new data key, online; resumes a run that was cut short."""
    from .storage.rekey import rekey as run_rekey

    with Client.open(volume) as client, tqdm(unit="chunk", desc="rekey", disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        report = run_rekey(client, on_chunk=progress, drop_old=drop_old)
    domains = "".join(f", /{d}: {n}" for d, n in sorted(report.domain_keys.items()) if d)
    click.echo(f"rekey: data key {report.key}{f' (key domains{domains[1:]})' if domains else ''}"
               f"{' (resumed)' if report.resumed else ''}: {report.chunks} chunks, "
               f"{report.blocks} block copies, {_human(report.bytes)} sealed again"
               + (f"; {report.skipped} chunks left (still open for appends by a running writer, or written "
                  "meanwhile under the old key): run it again once those writers have closed" if report.skipped else
                  "; done") + (f"; old keys {report.dropped} forgotten" if report.dropped else ""), err=True)


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.argument("dest")
@click.option("--threads", default=4, show_default=True,
              help="Source files read in parallel (per Ray task with --ray). From an object store (s3://...) "
                   "each read waits on the network: more threads help there.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Pack in parallel on a Ray cluster: one task per share of the files, each into its own chunks. "
                   "SOURCES may then be any fsspec URL (s3://, gs://, file://).")
@click.option("--ray-address", default=None, help="Ray cluster to use with --ray (default: RAY_ADDRESS, one running here, or a new local one).")
@metrics_option
@user_errors
def put(sources: tuple[str, ...], dest: str, threads: int, use_ray: bool, ray_address: str | None,
        metrics_at: str | None) -> None:
    """Copy local files or directories into a volume (like cp -r).

    If DEST is an existing directory, each source lands inside it; otherwise a single
    source becomes DEST. Files become visible in groups as their blocks are durable.
    """
    if not _is_bale(dest):
        raise click.UsageError(f"DEST must be a bale:// URL, got {dest!r}")
    volume, vdest = parse_url(dest)
    if use_ray:
        if (ray_address or os.environ.get("RAY_ADDRESS") or "auto") not in ("auto", "local"):
            # a named cluster: bound each wait of Ray's for it (read once, when Ray is imported)
            os.environ.setdefault("RAY_py_gcs_connect_timeout_s", "15")
        from .ingest_ray import connect  # without Ray installed, fail here, before the volume is touched

        with _stderr_held_back():  # Ray's own retry warnings: its failure is said in one line
            connect(ray_address)
    exposed = _expose_metrics(metrics_at)
    with Client.open(volume) as client:
        _watch_metrics(exposed, client, volume)
        try:
            into_dir = client.stat(vdest).kind == "d" and bool(vdest)
        except FileNotFoundError:
            into_dir = False
        if len(sources) > 1 and not into_dir and vdest:
            client.mkdir(vdest, parents=True, exist_ok=True)
            into_dir = True
        if use_ray:
            _put_ray(client, sources, vdest, into_dir, ray_address, min(threads, 4))
            return
        pairs: list[tuple[str, str]] = []
        for src in sources:
            files, empty = walk_local(src)
            pairs += _place(client, src, vdest, into_dir, files, empty, single=not os.path.isdir(src))
        t0 = time.monotonic()
        with tqdm(total=len(pairs), unit="file", desc="put", disable=None, smoothing=0.1) as bar:
            moved = [0]

            def progress(n: int, nbytes: int) -> None:
                moved[0] += nbytes
                bar.update(n)
                if bar.n % 256 == 0:
                    bar.set_postfix_str(f"{moved[0] / max(1e-9, time.monotonic() - t0) / 1e6:.0f} MB/s")

            files, nbytes = ingest_local(client, pairs, threads=threads, progress=progress)
        dt = max(1e-9, time.monotonic() - t0)
        click.echo(f"put {files} files, {_human(nbytes)} in {dt:.1f}s ({files / dt:.0f} files/s, {nbytes / dt / 1e6:.0f} MB/s)", err=True)


@contextlib.contextmanager
def _stderr_held_back():
    """Hold back what is written to the standard error (fd 2, so a C++ library's lines too)
    inside the block: replayed if the block succeeds, dropped if it raises (its error says it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        done = False
        try:
            yield
            done = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if done:
                held.seek(0)
                sys.stderr.buffer.write(held.read())
                sys.stderr.flush()


def _dest_base(src: str, vdest: str, into_dir: bool) -> str:
    """Where source `src` lands: inside `vdest` when that is a directory, else at `vdest`."""
    name = src.rstrip("/").rpartition("/")[2] if "://" in src else os.path.basename(os.path.abspath(src))
    if not vdest:
        return name
    return f"{vdest}/{name}" if into_dir else vdest


def _place(client: Client, src: str, vdest: str, into_dir: bool, files: list[tuple[str, str]], empty: list[str],
           single: bool) -> list[tuple[str, str]]:
    """(source path, volume path) of each file listed under `src`; makes its empty directories
    (and its own, when it holds no file) in the volume now."""
    base = _dest_base(src, vdest, into_dir)
    for rel in empty:
        client.mkdir(f"{base}/{rel}", parents=True, exist_ok=True)
    if not files and not single:
        client.mkdir(base, parents=True, exist_ok=True)
    return [(full, base if single else f"{base}/{rel}") for full, rel in files]


def _put_ray(client: Client, sources: tuple[str, ...], vdest: str, into_dir: bool, address: str | None,
             threads: int) -> None:
    """`put --ray`: list each source, then pack its shares with Ray tasks, with a progress bar."""
    from .ingest_ray import list_source, put_ray

    t0 = time.monotonic()
    files = nbytes = skipped = 0
    for src in sources:
        source, found, empty, single = list_source(src)
        pairs = _place(client, src, vdest, into_dir, found, empty, single)
        with tqdm(total=len(pairs), unit="file", desc=f"put --ray {src}", disable=None, smoothing=0.1) as bar:
            report = put_ray(client.cfg, source, pairs, address=address, threads=threads,
                             progress=lambda n, _b: bar.update(n))
        files, nbytes, skipped = files + report.files, nbytes + report.bytes, skipped + report.skipped
    dt = max(1e-9, time.monotonic() - t0)
    click.echo(f"put {files} files, {_human(nbytes)} in {dt:.1f}s ({files / dt:.0f} files/s) with Ray"
               + (f"; {skipped} already there, identical" if skipped else ""), err=True)


@main.command()
@click.argument("source")
@click.argument("dest")
@user_errors
def get(source: str, dest: str) -> None:
    """Copy a file or directory tree out of a volume (like cp -r)."""
    if not _is_bale(source):
        raise click.UsageError(f"SOURCE must be a bale:// URL, got {source!r}")
    volume, vsrc = parse_url(source)
    with Client.open(volume) as client:
        node = client.stat(vsrc)
        name = split_path(vsrc)[-1] if split_path(vsrc) else volume
        target = os.path.join(dest, name) if os.path.isdir(dest) else dest
        if node.kind != "d":
            entries = [("", node)]
        else:
            os.makedirs(target, exist_ok=True)
            entries = [(rel[len(vsrc):].lstrip("/") if vsrc else rel, n) for rel, n in client.walk(vsrc)]
        files = [(rel, n) for rel, n in entries if n.kind == "f"]
        for rel, n in entries:
            if n.kind == "d":
                os.makedirs(os.path.join(target, rel), exist_ok=True)
            elif n.kind == "l":
                os.symlink(n.target or "", os.path.join(target, rel))
        with tqdm(total=len(files), unit="file", desc="get", disable=None) as bar:
            batch: list[tuple[str, Inode]] = []
            budget = 0
            for i, (rel, n) in enumerate(files):
                batch.append((rel, n))
                budget += n.size
                if budget >= 256 << 20 or len(batch) >= 4096 or i == len(files) - 1:
                    paths = [f"{vsrc}/{r}" if r else vsrc for r, _ in batch]
                    for (r, n2), data in zip(batch, client.read_ranges([(p, 0, None) for p in paths])):
                        if isinstance(data, Exception):
                            raise data
                        out = os.path.join(target, r) if r else target
                        with open(out, "wb") as f:
                            f.write(data)
                        os.utime(out, ns=(n2.mtime_ns, n2.mtime_ns))
                    bar.update(len(batch))
                    batch, budget = [], 0


@main.command("ls")
@click.argument("url")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, size, modification time, name.")
@click.option("-R", "recursive", is_flag=True, help="List the whole tree below URL.")
@user_errors
def ls_cmd(url: str, long: bool, recursive: bool) -> None:
    """List a directory of a volume."""
    volume, vpath = parse_url(url)
    with Client.open(volume) as client:
        node = client.stat(vpath)
        if node.kind != "d":
            rows = [(split_path(vpath)[-1], node)]
        elif recursive:
            rows = [(rel[len(vpath):].lstrip("/") if vpath else rel, n) for rel, n in client.walk(vpath)]
        else:
            rows = client.listdir(vpath)
        out = sys.stdout
        for name, n in rows:
            if long:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(n.mtime_ns / 1e9))
                suffix = f" -> {n.target}" if n.kind == "l" else ""
                out.write(f"{stat_mod.filemode(mode_bits(n))} {n.size:>12} {when} {name}{suffix}\n")
            else:
                out.write(name + ("/" if n.kind == "d" else "") + "\n")


@main.command()
@click.argument("urls", nargs=-1, required=True)
@user_errors
def cat(urls: tuple[str, ...]) -> None:
    """Write the bytes of files to standard output."""
    out = sys.stdout.buffer
    for url in urls:
        volume, vpath = parse_url(url)
        with Client.open(volume) as client:
            reader = client.open_read(vpath)
            step = 16 << 20
            for start in range(0, reader.size, step):
                out.write(reader.read(start, start + step))
    out.flush()


@main.command()
@click.argument("url")
@click.option("-p", "--parents", is_flag=True, help="Make missing parents too; no error if it exists.")
@click.option("--key-domain", is_flag=True, help="Give the new directory a data key of its own (encrypted volumes; "
                                                 "before any file is written under it).")
@user_errors
def mkdir(url: str, parents: bool, key_domain: bool) -> None:
    """Make directory URL (bale://VOLUME/path), with --key-domain a key domain of its own."""
    volume, vpath = parse_url(url)
    if not split_path(vpath):
        raise click.BadParameter("name a directory under the volume's root", param_hint="URL")
    with Client.open(volume) as client:
        if key_domain and client.identity.keyring is None:
            raise click.UsageError(f"--key-domain: volume {volume!r} is not encrypted")
        if not key_domain:
            client.mkdir(vpath, parents=parents, exist_ok=parents)
        else:
            number = client.add_key_domain(vpath, parents)
            click.echo(f"/{'/'.join(split_path(vpath))}: a key domain of its own (data key {number})")


@main.command()
@click.argument("urls", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Remove directories and everything below them.")
@user_errors
def rm(urls: tuple[str, ...], recursive: bool) -> None:
    """Remove files (and with -r, directory trees). Their bytes become dead space until gc."""
    for url in urls:
        volume, vpath = parse_url(url)
        with Client.open(volume) as client:
            client.remove(vpath, recursive=recursive)


@main.command()
@click.argument("source")
@click.argument("dest")
@user_errors
def mv(source: str, dest: str) -> None:
    """Rename a file or directory atomically within a volume (replacing a file at DEST)."""
    v1, p1 = parse_url(source)
    v2, p2 = parse_url(dest)
    if v1 != v2:
        raise click.UsageError("mv works within one volume; use get and put to move between volumes")
    with Client.open(v1) as client:
        client.move(p1, p2)


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--no-scan", is_flag=True, help="Skip listing the nodes for blocks that metadata does not know.")
@user_errors
def df(volume: str, no_scan: bool) -> None:
    """Show a volume's files, chunks, live and dead bytes, and usage per node."""
    with Client.open(volume) as client:
        u = client.usage(scan_nodes=not no_scan)
        fmt = client.identity.format
    click.echo(f"volume {volume}: {u['files']} files, {u['dirs']} directories, {_human(u['file_bytes'])} in files")
    click.echo(f"format: {fmt.describe()}")
    click.echo(f"chunks: {u['chunks']}, {_human(u['chunk_bytes'])} packed, live {_human(u['live_bytes'])}, "
               f"dead {_human(u['dead_bytes'])}")
    _echo_baling(u["baling"])
    _echo_redundancy(u["redundancy"])
    click.echo(f"{'node':<40} {'blocks':>8} {'stored':>11} {'free':>11} {'orphans':>8} {'orphan bytes':>12}")
    total_orphans = 0
    for n in u["nodes"]:
        if "error" in n:
            click.echo(f"{n['url']:<40} error: {n['error']}")
            continue
        orphans = n.get("orphan_blocks", "-")
        total_orphans += n.get("orphan_blocks", 0)
        click.echo(f"{n['url']:<40} {n['blocks']:>8} {_human(n['stored_bytes']):>11} {_human(n['free']):>11} "
                   f"{orphans:>8} {_human(n.get('orphan_bytes', 0)) if 'orphan_bytes' in n else '-':>12}")
    if total_orphans:
        click.echo(f"{total_orphans} orphan block(s) on the nodes: written but never committed (interrupted "
                   "writes, or writes in flight right now); `balefs gc` reclaims those whose writer is gone")


def _echo_redundancy(r: dict) -> None:
    """df's lines on redundancy: the scheme, bytes on the nodes per byte of data, what is left to rebuild."""
    ratio = f" ({r['raw_bytes'] / r['logical_bytes']:.2f}x)" if r["logical_bytes"] else ""
    click.echo(f"redundancy: {r['scheme']}; stored {_human(r['raw_bytes'])} on the nodes for "
               f"{_human(r['logical_bytes'])} of data{ratio}")
    if r["blocks_to_rebuild"]:
        stripes = f" in {r['stripes_degraded']} degraded stripe(s)" if r["stripes_degraded"] else ""
        click.echo(f"degraded: {r['blocks_to_rebuild']} block(s){stripes} have no copy on a node that is up "
                   "(written short of a full quorum, or on nodes down); `balefs fsck --repair` rebuilds them")


def _size_label(n: int) -> str:
    """A size class bound: "64 KiB", "1 MiB" (whole units), else as _human."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return _human(n)


def _echo_baling(b: dict) -> None:
    """df's lines on how well the volume is baled: blocks, mean block size, blocks by size class."""
    if not b["blocks"]:
        click.echo("blocks: none")
        return
    full = b["block_size"]
    pct = 100 * b["mean_block"] / full
    click.echo(f"blocks: {b['blocks']}, mean {_human(b['mean_block'])} "
               f"({pct:.{1 if pct < 10 else 0}f}% of the {_size_label(full)} block size)")
    classes = []
    for c in b["by_size"]:
        label = "full" if c["max"] is None else (f"<{_size_label(c['max'])}" if c["min"] == 0
                                                 else f"{_size_label(c['min'])}-{_size_label(c['max'])}")
        classes.append(f"{label} {c['blocks']}")
    click.echo("blocks by size: " + ", ".join(classes))
    if b.get("unsynced"):
        click.echo(f"blocks not yet synced: {b['unsynced']} (files closed in them are durable at their writer's next "
                   "sync; if it crashed, the next mount or gc checks them)")


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--grace", default=3600.0, show_default=True,
              help="Seconds a chunk of a writer that may still be running is left alone.")
@click.option("--min-live", default=0.5, show_default=True,
              help="Compact chunks whose live bytes are below this fraction of their size (0 turns compaction off).")
@click.option("--min-block-fill", default=DEFAULT_MIN_BLOCK_FILL, show_default=True,
              help="Compact chunks of several blocks whose mean block is below this fraction of the block size "
                   "(badly baled: closed file by file), once sealed or their writer is gone (0 turns it off).")
@click.option("--dry-run", is_flag=True, help="Report what would be done, change nothing.")
@user_errors
def gc(volume: str, grace: float, min_live: float, min_block_fill: float, dry_run: bool) -> None:
    """Compact sparse and badly baled chunks, delete dead chunks and orphan blocks (never committed)."""
    for name, value in (("--min-live", min_live), ("--min-block-fill", min_block_fill)):
        if not 0 <= value <= 1:
            raise click.BadParameter(f"must lie between 0 and 1, not {value:g}", param_hint=name)
    with Client.open(volume) as client:
        r = collect_garbage(client, grace_s=grace, dry_run=dry_run, min_live=min_live, min_block_fill=min_block_fill)
    verb = "would" if dry_run else "did"
    click.echo(f"{verb} compact {r.compacted_chunks} chunk(s), {r.badly_baled_chunks} of them badly baled "
               f"({r.compacted_files} file(s), {_human(r.compacted_bytes)} live); "
               f"{verb} delete {r.dead_chunks} dead chunk(s) ({r.dead_blocks} block(s)) and {r.orphan_blocks} orphan block(s) "
               f"({_human(r.orphan_bytes)}); left {r.skipped_live_writer} block(s) of writers that may still be running")
    if r.compacted_waiting_writer:
        click.echo(f"{r.compacted_waiting_writer} compacted chunk(s) wait for their writer (still running, or younger "
                   f"than --grace) or the next gc, which deletes their blocks")
    if r.unlinked_open_files:
        click.echo(f"{verb} remove {r.unlinked_open_files} file(s) unlinked while open by a mount that died")
    if r.stray_temps:
        click.echo(f"{verb} remove {r.stray_temps} temporary block file(s) ({_human(r.stray_temp_bytes)}) "
                   f"left by writers killed mid-write")
    u = r.unsynced
    if u.settled_blocks or u.lost_blocks:
        click.echo(f"{verb} sync {u.settled_blocks} block(s) that a crashed writer closed files in but never synced"
                   + (f"; {u.lost_blocks} did not survive, {verb} remove the {len(u.dropped_files)} file(s) in them: "
                      + ", ".join(u.dropped_files[:10]) + (" ..." if len(u.dropped_files) > 10 else "")
                      if u.lost_blocks else ""))


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--no-probe", is_flag=True, help="Do not contact the nodes; show only what metadata knows.")
@user_errors
def status(volume: str, no_probe: bool) -> None:
    """Show every node and path of a volume: up/down, latency, errors, bytes moved, blocks held."""
    from .storage.status import volume_status

    with Client.open(volume) as client:
        rows = volume_status(client, probe=not no_probe)
        redundancy = client.usage(scan_nodes=False)["redundancy"]
        tier = _memory_tier_line(client.codec.volume, client.cfg.disk_cache_size) if client.codec.encrypted else None
    click.echo(f"block engine: {engine_name()}")
    click.echo(f"mount sessions: {_mount_sessions()}")
    if tier is not None:
        click.echo(f"host cache: {tier}")
    for n in rows:
        state = "up" if n["up"] else "DOWN"
        role = "" if n["in_use"] else " (not in placement: draining or drained)"
        click.echo(f"node {n['id']} {n['url']}: {state}, {n['blocks']} blocks, {_human(n['stored_bytes'])}{role}")
        for p in n["paths"]:
            lat = "-" if p["latency_ms"] is None else f"{p['latency_ms']:.1f} ms"
            click.echo(f"  path {p['path']}: {'up' if p['up'] else 'DOWN'}, latency {lat}, {p['requests']} requests, "
                       f"{p['errors']} errors, in {_human(p['bytes_in'])}, out {_human(p['bytes_out'])}"
                       + (f", last error: {p['last_error']}" if p["last_error"] else ""))
    _echo_redundancy(redundancy)


def _memory_tier_line(namespace: str, configured: int) -> str:
    """What status says of an encrypted volume's host cache (the loaders'): where it shares plaintext
    in memory and how much of this volume is there, or why decrypted blocks are not shared."""
    from .storage.diskcache import cache_usage
    from .storage.memroot import memory_bound, memory_cache_dir

    try:
        root = memory_cache_dir()
    except (OSError, ValueError) as exc:
        return f"decrypted blocks not shared between processes ({exc}); the disk tier holds ciphertext"
    if root is None:
        return ("decrypted blocks not shared between processes (no tmpfs at $XDG_RUNTIME_DIR or /dev/shm); "
                "the disk tier holds ciphertext")
    n, size = cache_usage(root).get(namespace, (0, 0))
    return (f"plaintext shared in memory at {root} (tmpfs, this user only, gone at reboot): {n} blocks, "
            f"{_human(size)} of this volume, bound {_human(memory_bound(configured, root))}; the disk tier holds ciphertext")


def _move_with_bar(client: Client, moves: list, what: str, rate: int | None = None) -> None:
    """Run block moves with a progress bar, at most `rate` bytes a second; exit 1 if any failed."""
    from .storage.rebalance import run_moves

    total = sum(m.rec.stored for m in moves)
    with tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=None) as bar:
        report = run_moves(client, moves, progress=lambda n, nbytes: bar.update(nbytes or 0), rate=rate)
    click.echo(f"{what}: moved {report.moved} block copies, added {report.added} missing copies, "
               f"{_human(report.bytes)}; {report.skipped} already done or gone; {len(report.errors)} failed", err=True)
    for e in report.errors[:10]:
        click.echo(f"  {e}", err=True)
    if report.errors:
        sys.exit(1)


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--add-node", "add", multiple=True, help="Add this node to the volume first (checked; repeatable).")
@click.option("--dry-run", is_flag=True, help="Say what would move, move nothing.")
@click.option("--rate", default=None, help="Copy or rebuild at most this much per second, e.g. 200MB/s (default: no limit).")
@user_errors
def rebalance(volume: str, add: tuple[str, ...], dry_run: bool, rate: str | None) -> None:
    """Even out block copies over the volume's nodes, restore missing replicas and move copies off
    nodes that left the volume. Copy, then record, then delete: files stay readable throughout.
    On an erasure-coded volume a block whose copy is lost is rebuilt from its stripe."""
    from .storage.rebalance import plan_rebalance

    limit = _parse_rate(rate, click.BadParameter)
    if add:
        Client.add_nodes(volume, add)
    with Client.open(volume) as client:
        moves = plan_rebalance(client)
        if dry_run:
            click.echo(f"would move {sum(m.src is not None for m in moves)} block copies and add "
                       f"{sum(m.src is None for m in moves)} missing ones ({_human(sum(m.rec.stored for m in moves))})")
            return
        _move_with_bar(client, moves, "rebalance", limit)


@main.command()
@click.argument("volume", type=VOLUME)
@click.argument("node")
@click.option("--rate", default=None, help="Copy or rebuild at most this much per second, e.g. 200MB/s (default: no limit).")
@user_errors
def drain(volume: str, node: str, rate: str | None) -> None:
    """Move every block copy off NODE (its URL or id) and take it out of the volume's placement.

    New blocks stop going to NODE at once (for clients opened from now on); files stay readable
    throughout. Run it again after long-running clients restart, to move what they wrote meanwhile.
    On an erasure-coded volume a lost node's blocks are rebuilt from the other blocks of their
    stripes, read from every surviving node at once."""
    from .storage.config import load_config, save_config
    from .storage.node_registry import normalize_node_url
    from .storage.rebalance import plan_drain

    limit = _parse_rate(rate, click.BadParameter)
    cfg = load_config(volume)
    with Client.open(volume) as client:
        known = client.meta.nodes()
        nid = int(node) if node.isdigit() and int(node) in known else next(
            (i for i, u in known.items() if u == normalize_node_url(node)), None)
        if nid is None:
            raise click.BadParameter(f"{node!r} is not a node of volume {volume}", param_hint="NODE")
        url, replicas = known[nid], client.cfg.replicas
    if url in cfg.nodes:
        cfg.nodes.remove(url)
        if len(cfg.nodes) < replicas:
            raise click.UsageError(f"draining {url} would leave {len(cfg.nodes)} node(s) for {replicas} replicas")
        cfg.validate()
        save_config(cfg, overwrite=True)
    with Client.open(volume) as client:
        _move_with_bar(client, plan_drain(client, nid), f"drain {url}", limit)
        client.release_node(nid)


class _FsckError(click.ClickException):
    """fsck's errors exit 2: exit 1 means the check ran and found problems that remain."""

    exit_code = 2


def _parse_rate(value: str | None, error: type[Exception] = _FsckError) -> int | None:
    """--rate: bytes per second, as '200MB/s', '1GiB' or 1048576; a bad value is one line (`error`)."""
    if value is None:
        return None
    try:
        return parse_rate(value, "--rate")
    except ValueError as exc:
        raise error(str(exc)) from None


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--repair", is_flag=True, help="Rewrite bad or missing copies from good ones, delete extra copies, "
              "recount drifted live bytes.")
@click.option("--rate", default=None, help="Read at most this much per second, e.g. 200MB/s (default: no limit).")
@click.option("--restart", is_flag=True, help="Start over instead of resuming an interrupted run.")
@metrics_option
@user_errors
def fsck(volume: str, repair: bool, rate: str | None, restart: bool, metrics_at: str | None) -> None:
    """Verify every block copy of VOLUME and its metadata; exit 0 clean (or all repaired), 1 problems remain, 2 error.

    Checks each copy's header, checksum, identity and length; finds missing, extra and orphan
    copies, extents that point nowhere and chunks whose live bytes drifted. Resumable: after
    Ctrl-C, the next run goes on where it stopped (--restart starts over)."""
    from .storage.fsck import check_volume, total_bytes

    limit = _parse_rate(rate)
    exposed = _expose_metrics(metrics_at)
    try:
        with Client.open(volume) as client:
            _watch_metrics(exposed, client, volume)
            t0 = time.monotonic()
            with tqdm(total=total_bytes(client), unit="B", unit_scale=True, desc="fsck", disable=None) as bar:
                read_now = [0]  # by this run (a resumed run's report counts the earlier ones' too)

                def progress(_chunk: int, nbytes: int) -> None:
                    read_now[0] += nbytes
                    bar.update(nbytes)

                try:
                    report = check_volume(client, repair=repair, rate=limit, progress=progress, restart=restart)
                except KeyboardInterrupt:
                    bar.close()
                    click.echo(f"balefs: fsck of {volume} interrupted; run it again to resume (--restart starts over)",
                               err=True)
                    sys.exit(130)
    except (BaleError, OSError, ValueError) as exc:
        raise _FsckError(str(exc)) from None
    dt = max(1e-9, time.monotonic() - t0)
    r = report
    if r.resumed_from is not None:
        click.echo(f"resumed an interrupted fsck after chunk {r.resumed_from}")
    for line in r.problems:
        click.echo(f"  {line}")
    click.echo(f"checked {r.chunks} chunk(s), {r.blocks} block(s), {r.copies} cop(ies); read {_human(read_now[0])} "
               f"in {dt:.1f}s ({read_now[0] / dt / 1e6:.0f} MB/s)"
               + (f", {_human(r.bytes_read)} with the interrupted run" if r.resumed_from is not None else ""))
    click.echo(f"corrupt copies {r.corrupt_copies}, missing {r.missing_copies}, unreadable {r.unreadable_copies}, "
               f"extra {r.extra_copies}, orphan blocks {r.orphan_blocks}, dangling extents {r.dangling_extents}, "
               f"live counters off {r.live_drift}" + (f"; {r.in_flux} block(s) in flux (not synced, or not committed yet), skipped" if r.in_flux else ""))
    if repair:
        click.echo(f"repaired {r.repaired_copies} cop(ies), removed {r.removed_extra} extra, recounted {r.fixed_live} "
                   f"live counter(s); {r.unrepairable_blocks} block(s) without a good copy")
    if r.orphan_blocks:
        click.echo("orphan blocks are deleted by `balefs gc`")
    if r.dangling_extents:
        click.echo("dangling extents: the files named above have lost bytes; restore them or remove them")
    left = r.remaining()
    if not left:
        click.echo("clean")
    else:
        click.echo(f"{left} problem(s) remain" if repair else f"{left} problem(s) found; --repair fixes copies and counters")
    if left:
        sys.exit(1)


@main.command("migrate-meta")
@click.argument("volume", type=VOLUME)
@click.option("--to", "to_url", required=True, help="The new metadata store, e.g. postgresql://user:password@host:5432/db (must be empty).")
@user_errors
def migrate_meta_cmd(volume: str, to_url: str) -> None:
    """Move VOLUME's metadata into another store (e.g. from the embedded SQLite file into PostgreSQL).

    Copies every row in one transaction, verifies the copy file by file (paths, sizes, hashes,
    extents, blocks), then switches the volume's config. Stop the volume's clients first; the
    old store is left in place, unused."""
    from .storage.migrate_meta import migrate_meta

    with tqdm(unit="row", desc="copy", disable=None) as copy_bar, tqdm(unit="entry", desc="verify", disable=None) as check_bar:
        report = migrate_meta(volume, to_url, copy_progress=lambda _t, n: copy_bar.update(n),
                              verify_progress=check_bar.update)
    from .storage.config import load_config

    click.echo(f"migrated {volume}: {report.rows} rows, {report.files} files ({_human(report.bytes)}) and "
               f"{report.dirs} directories verified; metadata now {redact_url(load_config(volume).meta_url)}", err=True)


@main.command("mount")
@click.argument("volume", type=VOLUME)
@click.argument("mountpoint")
@click.option("--foreground", is_flag=True, help="Serve in this process until unmounted (for debugging); default: in the background.")
@click.option("--read-only", is_flag=True, help="Mount read-only: every change fails with EROFS.")
@click.option("--cache-size", default=None, help="Memory block cache of the mount (default: the volume's, e.g. 1GiB).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Local disk cache tier for blocks, kept across remounts (also holds spool files of random writes).")
@click.option("--disk-cache-size", default=None, help="Bound of the disk cache in bytes (default 10GiB).")
@click.option("--allow-other", is_flag=True, help="Let other users than the one mounting use the mount (permission bits still apply).")
@click.option("--uid", type=int, default=None, help="Report every file and directory as owned by this user id.")
@click.option("--gid", type=int, default=None, help="Report every file and directory as owned by this group id.")
@click.option("--attr-timeout", type=float, default=None,
              help="Seconds the kernel caches attributes and names (and, read-only, absent names); a stat of a file "
                   "changed by another mount is seen after at most this. Default 60 (a read-write native session still "
                   "sees such a change at each open), or 1 read-write on --session python.")
@click.option("--noatime", is_flag=True, help="Reads leave access times alone (default: relatime, as Linux: a read "
              "moves a file's atime when it is older than its mtime or ctime, or a day old).")
@click.option("--readahead", default="4MiB", show_default=True,
              help="Kernel readahead window for sequential reads of the mount (set when run as root; 0 leaves the kernel's).")
@click.option("--session", type=click.Choice(["auto", "native", "python"]), default="auto", show_default=True,
              help="Who serves the kernel: native (C, libfuse's low-level API: lookups, stats, listings, opens and "
                   "reads without Python, large writes gathered; changes go to the Python operations; read-only or "
                   "read-write), python (every operation in Python), or auto: native where this build has it "
                   "(`balefs --version` says), else python.")
@click.option("--cached-opens", is_flag=True,
              help="With --read-only --session native: the kernel opens files without asking the daemon, so a warm "
                   "read costs it nothing; a file changed by another mount is then seen once the kernel reads its "
                   "attributes again (--attr-timeout, 60 s), not at its next open. For datasets that do not change.")
@click.option("--threads", type=click.IntRange(1, 256), default=4, show_default=True,
              help="FUSE requests served at once. On few cores more threads only contend for Python's lock.")
@click.option("--sync-close", is_flag=True, default=None,
              help="Make every close() durable (its blocks and the metadata fsynced before close returns; slower, "
                   "a block per file). Default: close() makes a file visible to every client and safe from a crash of "
                   "the daemon; it is durable after fsync, `balefs sync MOUNTPOINT`, unmount, or --sync-interval seconds.")
@click.option("--sync-interval", type=click.FloatRange(min=0.01), default=None,
              help="Seconds within which a closed file becomes durable without fsync (default 5).")
@click.option("--scrub-rate", default=None,
              help="Verify the volume's block copies in the background at most this fast, e.g. 20MB/s, rewriting bad "
                   "ones from good copies (read-write mounts); one pass, then an hour's rest. Default: off.")
@click.option("--audit-reads", type=click.FloatRange(0, 1), default=None, metavar="RATE",
              help="Record this share of the opens for reading in the volume's audit table (0 none, 1 every one; "
                   "default: the config's audit_reads, 0). See `balefs audit`.")
@click.option("--debug", is_flag=True, help="Log every FUSE request (with --foreground).")
@metrics_option
@click.option("--ready-fd", type=int, default=None, hidden=True)
@user_errors
def mount_cmd(volume: str, mountpoint: str, foreground: bool, read_only: bool, cache_size: str | None,
              cache_dir: str | None, disk_cache_size: str | None, allow_other: bool, uid: int | None, gid: int | None,
              attr_timeout: float | None, noatime: bool, readahead: str, threads: int, sync_close: bool | None,
              sync_interval: float | None, scrub_rate: str | None, audit_reads: float | None, debug: bool,
              metrics_at: str | None, ready_fd: int | None, session: str, cached_opens: bool) -> None:
    """Mount VOLUME at MOUNTPOINT as a POSIX filesystem (FUSE).

    Returns once the mount works; files written and closed there are packed into chunks
    and visible to every client. Unmount with `balefs umount MOUNTPOINT`.
    """
    from .fuse.mount import MountOptions, mount, serve

    opts = MountOptions(read_only=read_only, cache_size=cache_size, cache_dir=cache_dir, disk_cache_size=disk_cache_size,
                        allow_other=allow_other, uid=uid, gid=gid, attr_timeout=attr_timeout, noatime=noatime,
                        readahead=None if readahead in ("0", "") else readahead, threads=threads, debug=debug,
                        sync_close=True if sync_close else None, sync_interval=sync_interval,
                        scrub_rate=None if scrub_rate is None else parse_rate(scrub_rate, "--scrub-rate"),
                        audit_reads=audit_reads, metrics=metrics_at, session=session, cached_opens=cached_opens)
    if metrics_at:
        from .metrics import parse_endpoint

        parse_endpoint(metrics_at)  # a malformed value: one line here, not a daemon that fails to start
    if ready_fd is not None:  # the daemon started by a background mount
        import logging
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from .fuse.mount import check_can_mount
        serve(volume, check_can_mount(volume, mountpoint), opts, ready_fd=ready_fd)
        return
    pid = mount(volume, mountpoint, opts, foreground=foreground)
    if not foreground:
        click.echo(f"mounted {volume} at {os.path.abspath(mountpoint)} ({opts.session} session, daemon pid {pid}); "
                   f"unmount with: balefs umount {mountpoint}", err=True)
        if metrics_at:
            from .metrics import endpoint_of

            click.echo(f"metrics at {endpoint_of(pid)}", err=True)


@main.command("umount")
@click.argument("mountpoint")
@click.option("--lazy", is_flag=True, help="Detach at once even if files are open; they are committed when closed.")
@user_errors
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount a balefs mount after every file on it is committed (also cleans up a dead mount)."""
    from .fuse.mount import umount

    click.echo(umount(mountpoint, lazy=lazy), err=True)


@main.command("sync")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@user_errors
def sync_cmd(mountpoint: str) -> None:
    """Make every file closed on the balefs mount at MOUNTPOINT durable (sync(1) does not reach
    a FUSE filesystem's daemon on Linux; this fsyncs the mount's root directory, which does)."""
    from .fuse.mount import sync_mount

    sync_mount(mountpoint)


@main.command()
@click.argument("url")
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False),
              help="The disk cache directory to fill (the one the mount or loaders use with --cache-dir / cache_dir).")
@click.option("--disk-cache-size", default=None, help="Bound of the disk cache in bytes (default: the volume's, 10GiB); give the one the mount uses: a smaller one evicts down to it.")
@click.option("--threads", type=click.IntRange(1, 256), default=8, show_default=True, help="Blocks fetched at once.")
@metrics_option
@user_errors
def warmup(url: str, cache_dir: str, disk_cache_size: str | None, threads: int, metrics_at: str | None) -> None:
    """Stage the blocks of a tree (bale://VOLUME/tree) into this host's disk cache, verified, in parallel.

    Blocks already cached are skipped. When the tree does not fit under the cache's bound, the
    first part of it (in storage order) is warmed and the rest left out, never evicting what was
    just fetched. Exits 1 when a block could not be read or the cache disk filled up."""
    from .storage.warmup import plan_warmup, run_warmup

    volume, tree = parse_url(url)
    options: dict[str, object] = {"cache_dir": os.path.abspath(cache_dir)}
    if disk_cache_size is not None:
        options["disk_cache_size"] = parse_size(disk_cache_size, "--disk-cache-size")
    os.makedirs(options["cache_dir"], exist_ok=True)
    exposed = _expose_metrics(metrics_at)
    with Client.open(volume, **options) as client:
        _watch_metrics(exposed, client, volume)
        plan = plan_warmup(client, tree)
        click.echo(f"warmup bale://{volume}/{tree}: {plan.files} files, {len(plan.to_fetch)} blocks to fetch "
                   f"({_human(plan.fetch_bytes)}), {plan.cached} already cached, bound {_human(plan.bound)}", err=True)
        if plan.over_bound:
            click.echo(f"the tree does not fit in the disk cache: warming its first part only; {plan.over_bound} "
                       f"block(s) ({_human(plan.over_bound_bytes)}) left out (raise --disk-cache-size)", err=True)
        with tqdm(total=plan.fetch_bytes, unit="B", unit_scale=True, desc="warmup", disable=None) as bar:
            report = run_warmup(client, plan, threads=threads, progress=bar.update)
    dt = max(1e-9, report.seconds)
    click.echo(f"warmed {report.fetched} blocks, {_human(report.fetched_bytes)} in {dt:.1f}s "
               f"({report.fetched_bytes / dt / 1e6:.0f} MB/s); {plan.cached} already cached, "
               f"{plan.unsynced} not synced yet (skipped), {plan.over_bound} over the bound, "
               f"{len(report.failed)} failed", err=True)
    for line in report.failed[:10]:
        click.echo(f"  failed: {line}", err=True)
    if report.disk_full:
        click.echo(f"balefs: error: the cache disk is full ({report.disk_full}): stopped with "
                   f"{report.not_fetched} block(s) not warmed; what was warmed stays usable", err=True)
    if not report.ok:
        sys.exit(1)


@main.command("stats")
@click.argument("volume")
@click.option("--job", default=None, help="Drill into one training job: its data stall, samples/s, checkpoint time, "
              "and the node or cache its time goes to.")
@click.option("--url", default=None, metavar="PROMETHEUS_URL",
              help="Read a Prometheus server's HTTP API (e.g. http://prom:9090) instead of this host's processes.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between two readings (rates are their difference).")
@click.option("--once", is_flag=True, help="Print one view and exit, instead of refreshing it until Ctrl-C.")
@user_errors
def stats_cmd(volume: str, job: str | None, url: str | None, interval: float, once: bool) -> None:
    """Live view of VOLUME from the metrics of this host's processes (--metrics, BALEFS_METRICS) or
    a Prometheus server: ops/s, MB/s, cache hit ratio, latency per node and path, the slowest node."""
    from .metrics.stats import run_stats

    run_stats(volume, job=job, url=url, interval=interval, once=once)


@main.command("cache")
@click.argument("volume", type=VOLUME, required=False)
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False), help="The disk cache directory.")
@click.option("--evict", is_flag=True, help="Delete the cached blocks (of VOLUME only, when given).")
@user_errors
def cache_cmd(volume: str | None, cache_dir: str, evict: bool) -> None:
    """Show what a disk cache directory holds per volume (blocks, bytes, bound), or --evict it."""
    from .storage.config import load_config
    from .storage.diskcache import cache_usage, evict_entries
    from .storage.meta.registry import open_meta

    namespace = bound = None
    if volume is not None:
        cfg = load_config(volume)
        store = open_meta(cfg.meta_url)
        try:
            namespace = store.volume_uuid()
        finally:
            store.close()
        bound = cfg.disk_cache_size
    if evict:
        n, size = evict_entries(cache_dir, namespace)
        click.echo(f"evicted {n} blocks, {_human(size)} from {cache_dir}" + (f" (volume {volume})" if volume else ""))
        return
    usage = cache_usage(cache_dir)
    if namespace is not None:
        usage = {namespace: usage.get(namespace, (0, 0))}
    for ns, (n, size) in sorted(usage.items()):
        who = f"volume {volume} ({ns})" if volume else f"volume uuid {ns}"
        tail = f", bound {_human(bound)} (the volume's disk_cache_size; {100 * size / bound:.0f}% full)" if bound else ""
        click.echo(f"{who}: {n} blocks, {_human(size)}{tail}")
    if not usage:
        click.echo(f"{cache_dir}: empty")


@main.command()
@click.argument("url")
@click.option("--rebuild", is_flag=True, help="Build it anew even when the stored snapshot is fresh.")
@user_errors
def snapshot(url: str, rebuild: bool) -> None:
    """Freeze the listing of a tree into a snapshot index (Arrow IPC, stored in the volume) that
    loaders memory-map: readers then make no metadata queries. Reused while the tree is unchanged."""
    from .storage.snapshot import open_snapshot

    volume, tree = parse_url(url)
    t0 = time.monotonic()
    with Client.open(volume) as client:
        snap = open_snapshot(client, tree, rebuild=rebuild)
    size = int(snap.column("size").sum())
    click.echo(f"snapshot of bale://{volume}/{tree}: {len(snap)} files, {_human(size)}, {len(snap.blocks)} chunks, "
               f"{len(snap.classes)} classes, fingerprint {snap.fingerprint} in {time.monotonic() - t0:.1f}s; "
               f"stored at bale://{volume}/{snap.location}")


if __name__ == "__main__":
    main()
