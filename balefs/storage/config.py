"""Volume configs: one human-readable TOML file per volume under $BALEFS_HOME."""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import tomli_w

from ..errors import ConfigError, VolumeExistsError, VolumeNotFoundError
from .crypto import KEY_SERVICES, MasterSource
from .meta.types import split_path
from .node_registry import normalize_node_url
from .placement import parse_ec
from .volume_format import FORMAT_KEYS, VolumeFormat, refuse_changed_format, refuse_format_options

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_OFF_BY_DEFAULT = ("key_passphrase", "insecure_transport")  # left out of a TOML while off: older releases read it
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def balefs_home() -> str:
    """The directory that holds volume configs: $BALEFS_HOME or ~/.config/balefs."""
    return os.path.abspath(os.path.expanduser(os.environ.get("BALEFS_HOME") or "~/.config/balefs"))


def host_cache_dir() -> str:
    """The host's shared block cache directory when none is configured: $BALEFS_CACHE_DIR, else
    /var/tmp/balefs-<uid>/cache (local to the host, kept across reboots, one per user)."""
    env = os.environ.get("BALEFS_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join("/var/tmp", f"balefs-{os.getuid()}", "cache")


def parse_size(value: int | str, what: str = "size") -> int:
    """Parse 4194304, '4MiB', '64M' or '1.5g' into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: cannot read {value!r} as a size (e.g. 4MiB, 64M, 1073741824)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_rate(value: str, what: str = "rate") -> int:
    """Parse bytes per second: '200MB/s', '1GiB' or 1048576; more than zero."""
    rate = parse_size(value[:-2] if value.lower().endswith("/s") else value, what)
    if rate <= 0:
        raise ConfigError(f"{what}: must be more than 0 bytes per second, not {value!r}")
    return rate


def _whole(value: object, what: str) -> int:
    """A setting that counts things: an int or its decimal string; never 1.5, True or 'two'."""
    if not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"{what} must be a whole number, not {value!r}")


def check_volume_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ConfigError(f"bad volume name {name!r}: use letters, digits, '-', '_' or '.', up to 63 characters")
    return name


@dataclass
class VolumeConfig:
    """Everything a client needs to open a volume.

    The format settings (volume_format.FORMAT_KEYS) are the volume's, kept in its metadata: None
    here until an open fills them in (with_format, in Client); a host config that names them (one
    of an older release) must name the stored values."""

    name: str
    nodes: list[str]
    meta: str = ""
    chunk_size: int | None = None
    block_size: int | None = None
    replicas: int | None = None
    write_quorum: int | None = None  # copies of a block that must be stored before it counts as durable; 0: all `replicas`
    compression: str | None = None
    ec: str | None = None  # erasure code 'K+M' instead of replicas ("": replicas); see VolumeFormat.ec
    cache_size: int = 1 << 30
    meta_cache_ttl: float = 1.0
    readahead_blocks: int = 4
    io_threads: int = 16
    upload_inflight: int = 32
    cache_dir: str = ""
    disk_cache_size: int = 10 << 30
    # read through the host's shared disk cache (cache_dir, else host_cache_dir()): blocks read from
    # the nodes are published there at once and every block is served mapped from its entry, so the
    # memory cache holds views of the kernel's page cache, one copy for every process of the host
    host_cache: bool = False
    # with host_cache: a durable plain block whose first copy is a local block file is served as a
    # mapping of that file (the node's own page-cache copy, shared by every process of the host)
    # rather than copied into the host cache; off for nodes whose directory is slower than the cache's
    # disk (a network filesystem mounted as a local node)
    map_local_blocks: bool = True
    # whether close() makes a file durable (fsync of its blocks and of the metadata) or only
    # visible, durable at the next sync (fsync, the client's close, or every sync_interval
    # seconds); None: the interface's default (synced for the Python API and `put`, not for
    # the mount and fsspec)
    sync_close: bool | None = None
    sync_interval: float = 5.0
    # where this host finds an encrypted volume's master key (crypto.MasterSource): a key file
    # (mode 0600), an environment variable, or a passphrase read from $BALEFS_PASSPHRASE
    key_file: str = ""
    key_env: str = ""
    key_passphrase: bool = False
    key_service: str = ""  # "pg": the PostgreSQL metadata holds the key, released only under a valid grant
    insecure_transport: bool = False  # let an encrypted volume use plain-HTTP nodes or a non-TLS database (transit.py)
    # the share of opens for reading recorded in the audit table (0: none, 1: every one), drawn per open
    audit_reads: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_volume_name(self.name)
        if not self.nodes:
            raise ConfigError(f"volume {self.name!r}: no nodes (give at least one --node)")
        if not all(isinstance(n, str) for n in self.nodes):
            raise ConfigError(f"volume {self.name!r}: every node must be a URL or directory path (a string)")
        self.nodes = [normalize_node_url(n) for n in self.nodes]
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"volume {self.name!r}: a node is listed twice")
        for key in ("chunk_size", "block_size", "cache_size"):
            if not (key in FORMAT_KEYS and getattr(self, key) is None):
                setattr(self, key, parse_size(getattr(self, key), key))
        self.disk_cache_size = parse_size(self.disk_cache_size, "disk_cache_size")
        if self.key_file:
            self.key_file = os.path.abspath(os.path.expanduser(str(self.key_file)))
        if self.key_service:
            if self.key_service not in KEY_SERVICES:
                raise ConfigError(f"key_service {self.key_service!r}: the key services are {', '.join(KEY_SERVICES)}")
            if not self.meta_url.startswith(("postgresql://", "postgres://")):
                raise ConfigError(f"volume {self.name!r}: the {self.key_service} key service keeps the key in PostgreSQL "
                                  "metadata: give --meta postgresql://...")
        if self.cache_dir:
            self.cache_dir = os.path.abspath(os.path.expanduser(str(self.cache_dir)))
        for key in ("replicas", "write_quorum", "readahead_blocks", "io_threads", "upload_inflight"):
            if not (key in FORMAT_KEYS and getattr(self, key) is None):
                setattr(self, key, _whole(getattr(self, key), key))
        fmt = self.volume_format()  # the settings this config leaves to the metadata checked as their defaults
        if not 4096 <= fmt.block_size <= 1 << 30:
            raise ConfigError(f"block_size {fmt.block_size} must lie between 4 KiB and 1 GiB")
        if fmt.chunk_size < fmt.block_size or fmt.chunk_size % fmt.block_size:
            raise ConfigError(f"chunk_size {fmt.chunk_size} must be a multiple of block_size {fmt.block_size}")
        if not 1 <= fmt.replicas <= len(self.nodes):
            raise ConfigError(f"replicas must be 1 or more, got {fmt.replicas}" if fmt.replicas < 1 else
                              f"replicas={fmt.replicas} needs at least that many nodes (volume has {len(self.nodes)})")
        if fmt.ec:
            self._validate_ec(fmt)
        elif not 0 <= fmt.write_quorum <= fmt.replicas:
            raise ConfigError(f"write_quorum={fmt.write_quorum} must lie between 1 and replicas={fmt.replicas} (0: all replicas)")
        if fmt.compression not in ("none", "lz4"):
            raise ConfigError(f"compression {fmt.compression!r}: use 'none' or 'lz4'")
        if self.sync_close is not None and not isinstance(self.sync_close, bool):
            raise ConfigError(f"sync_close must be true or false, not {self.sync_close!r}")
        for name in ("host_cache", "map_local_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if isinstance(self.sync_interval, bool) or not isinstance(self.sync_interval, (int, float)) or self.sync_interval <= 0:
            raise ConfigError(f"sync_interval must be a positive number of seconds, not {self.sync_interval!r}")
        if isinstance(self.audit_reads, bool) or not isinstance(self.audit_reads, (int, float)) or not 0 <= self.audit_reads <= 1:
            raise ConfigError(f"audit_reads must be a share of opens between 0 and 1, not {self.audit_reads!r}")
        if isinstance(self.meta_cache_ttl, bool) or not isinstance(self.meta_cache_ttl, (int, float)):
            raise ConfigError(f"meta_cache_ttl must be a number of seconds, not {self.meta_cache_ttl!r}")
        for key in ("readahead_blocks", "io_threads", "upload_inflight"):
            if getattr(self, key) < (0 if key == "readahead_blocks" else 1):
                raise ConfigError(f"{key} must be positive")

    def _validate_ec(self, fmt: VolumeFormat) -> None:
        """An erasure-coded format: K+M, no more blocks per stripe than nodes, replicas 1, a quorum of k+1 or more."""
        k, m = parse_ec(fmt.ec)
        if fmt.replicas != 1:
            raise ConfigError(f"erasure code {fmt.ec} and replicas={fmt.replicas}: a volume has one or the other")
        if k + m > len(self.nodes):
            raise ConfigError(f"erasure code {fmt.ec} puts each stripe's {k + m} blocks on distinct nodes: "
                              f"it needs {k + m} nodes (volume has {len(self.nodes)})")
        if fmt.write_quorum and not k + 1 <= fmt.write_quorum <= k + m:
            raise ConfigError(f"write_quorum={fmt.write_quorum} with erasure code {fmt.ec} must lie between "
                              f"{k + 1} and {k + m} blocks of a stripe (0: all {k + m})")

    @property
    def meta_url(self) -> str:
        """The metadata store; by default an SQLite file beside the config."""
        return self.meta or f"sqlite://{os.path.join(balefs_home(), self.name + '.db')}"

    def with_options(self, options: dict[str, Any]) -> "VolumeConfig":
        """A copy with fsspec storage_options applied on top; the format's settings are refused."""
        known = {f.name for f in fields(self)}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown volume option(s): {', '.join(sorted(unknown))}")
        refuse_format_options(self.name, options)
        return VolumeConfig(**{**asdict(self), **options})

    def stated_format(self) -> dict[str, Any]:
        """The format settings this config names itself (those of an older release's TOML)."""
        return {k: getattr(self, k) for k in FORMAT_KEYS if getattr(self, k) is not None}

    def volume_format(self) -> VolumeFormat:
        """The format this config names, defaults for the rest: the format `balefs init` stores."""
        return VolumeFormat(**self.stated_format())

    def with_format(self, fmt: VolumeFormat) -> "VolumeConfig":
        """A copy with the volume's format filled in; a setting this config names otherwise is refused."""
        refuse_changed_format(self.name, fmt, self.stated_format(), config_path(self.name))
        return replace(self, **fmt.settings())

    def without_format(self) -> "VolumeConfig":
        """A copy that leaves the format to the metadata: what a new volume's TOML holds."""
        return replace(self, **dict.fromkeys(FORMAT_KEYS))

    def master_source(self) -> MasterSource:
        """Where this host finds the volume's master key (used only if the volume is encrypted)."""
        return MasterSource(self.key_file, self.key_env, bool(self.key_passphrase), key_service=self.key_service)

    def to_toml(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "name"}
        data = {k: v for k, v in data.items() if v not in ("", None) and not (k in _OFF_BY_DEFAULT and v is False)}
        return (f"# balefs volume {self.name!r}; edit with care: nodes hold the volume's blocks\n"
                "# its format (block and chunk size, replicas, write quorum, compression) is kept in its metadata\n"
                + tomli_w.dumps(data))


def parse_bale_url(url: str, what: str = "path") -> tuple[str, str]:
    """Split `bale://VOLUME/path` (or `VOLUME/path`) into (volume, normalised volume path).
    ValueError names what was expected, for a missing volume or a '..' component."""
    rest = url[len("bale://"):] if url.startswith("bale://") else url
    volume, _, path = rest.strip("/").partition("/")
    if not volume:
        raise ValueError(f"{url!r}: expected bale://VOLUME/{what}")
    return volume, "/".join(split_path(path))


def config_path(name: str) -> str:
    return os.path.join(balefs_home(), check_volume_name(name) + ".toml")


def load_config(name: str) -> VolumeConfig:
    """Read the config of volume `name`, with a clear error when missing or malformed."""
    path = config_path(name)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise VolumeNotFoundError(name, balefs_home()) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    known = {f.name for f in fields(VolumeConfig)} - {"name"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    if "nodes" not in data or not isinstance(data["nodes"], list):
        raise ConfigError(f"{path}: 'nodes' must be a list of node URLs")
    try:
        return VolumeConfig(name=name, **data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_config(cfg: VolumeConfig, overwrite: bool = False) -> str:
    """Write the config atomically; refuse to replace an existing volume unless told to."""
    path = config_path(cfg.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and not overwrite:
        raise VolumeExistsError(f"volume {cfg.name!r} already exists ({path})")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(cfg.to_toml())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
