"""Volume configs: one human-readable TOML file per volume under $BALEFS_HOME."""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import tomli_w

from ..errors import ConfigError, VolumeExistsError, VolumeNotFoundError
from .crypto import MasterSource
from .meta.types import split_path
from .node_registry import normalize_node_url
from .volume_format import FORMAT_KEYS, VolumeFormat, refuse_changed_format, refuse_format_options

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_OFF_BY_DEFAULT = ("key_passphrase", "insecure_transport")  # left out of a TOML while off: older releases read it
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def balefs_home() -> str:
    """The directory that holds volume configs: $BALEFS_HOME or ~/.config/balefs."""
    return os.path.abspath(os.path.expanduser(os.environ.get("BALEFS_HOME") or "~/.config/balefs"))


def parse_size(value: int | str, what: str = "size") -> int:
    """Parse 4194304, '4MiB', '64M' or '1.5g' into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: cannot read {value!r} as a size (e.g. 4MiB, 64M, 1073741824)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * _UNITS[unit])


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
    cache_size: int = 1 << 30
    meta_cache_ttl: float = 1.0
    readahead_blocks: int = 4
    io_threads: int = 16
    upload_inflight: int = 32
    cache_dir: str = ""
    disk_cache_size: int = 10 << 30
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
    insecure_transport: bool = False  # let an encrypted volume use plain-HTTP nodes or a non-TLS database (transit.py)

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
        if not 0 <= fmt.write_quorum <= fmt.replicas:
            raise ConfigError(f"write_quorum={fmt.write_quorum} must lie between 1 and replicas={fmt.replicas} (0: all replicas)")
        if fmt.compression not in ("none", "lz4"):
            raise ConfigError(f"compression {fmt.compression!r}: use 'none' or 'lz4'")
        if self.sync_close is not None and not isinstance(self.sync_close, bool):
            raise ConfigError(f"sync_close must be true or false, not {self.sync_close!r}")
        if isinstance(self.sync_interval, bool) or not isinstance(self.sync_interval, (int, float)) or self.sync_interval <= 0:
            raise ConfigError(f"sync_interval must be a positive number of seconds, not {self.sync_interval!r}")
        if isinstance(self.meta_cache_ttl, bool) or not isinstance(self.meta_cache_ttl, (int, float)):
            raise ConfigError(f"meta_cache_ttl must be a number of seconds, not {self.meta_cache_ttl!r}")
        for key in ("readahead_blocks", "io_threads", "upload_inflight"):
            if getattr(self, key) < (0 if key == "readahead_blocks" else 1):
                raise ConfigError(f"{key} must be positive")

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
        return MasterSource(self.key_file, self.key_env, bool(self.key_passphrase))

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
