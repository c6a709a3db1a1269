"""The volume's format: the settings every client of a volume must share, kept in its metadata.

Block and chunk size, replicas, write quorum, compression and the block format decide where
a volume's bytes are and how they are encoded, so they are fixed when the volume is created
(`balefs init`) and stored in its metadata store (as JuiceFS keeps its `Format`), never taken
from a host's config or a caller's options. Each chunk also records its own layout
(meta.ChunkLayout), so chunks of another layout can later live beside today's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import ConfigError
from .codec import VERSION as BLOCK_FORMAT
from .meta import ChunkLayout, Meta

#: the format's settings a host config may still name (configs of older releases carry them)
FORMAT_KEYS = ("block_size", "chunk_size", "replicas", "write_quorum", "compression", "ec")
_SIZES = ("block_size", "chunk_size")
SCHEMA2_BLOCK_FORMAT = 2  # the block format of the last release of metadata schema 2 (codec.VERSION then)


@dataclass(frozen=True)
class VolumeFormat:
    """The settings fixed at a volume's creation; defaults are `balefs init`'s."""

    block_size: int = 4 << 20
    chunk_size: int = 64 << 20
    replicas: int = 1
    write_quorum: int = 0  # copies of a block that must be stored before it counts as durable; 0: all `replicas`
    compression: str = "none"
    block_format: int = BLOCK_FORMAT  # the codec's block format version that new blocks are written in
    ec: str = ""  # erasure code 'K+M' (k data + m parity blocks per stripe) instead of replicas; "": replicas
    encryption: str = "none"  # 'aes-256-gcm': every block payload sealed (crypto.py); keys in the metadata

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "VolumeFormat":
        """The format as stored in the metadata (refusing one this release cannot honour)."""
        unknown = set(record) - {f.name for f in fields(cls)}
        fmt = cls(**{k: v for k, v in record.items() if k not in unknown})
        # an EC volume stores its `ec`: a release before erasure codes refuses it as unknown
        if unknown or fmt.block_format > BLOCK_FORMAT:
            raise ConfigError(f"the volume's format ({', '.join(sorted(unknown)) or f'block format {fmt.block_format}'}) "
                              "is newer than this balefs: upgrade balefs")
        return fmt

    def settings(self) -> dict[str, Any]:
        """The settings of FORMAT_KEYS, as a config names them."""
        return {k: getattr(self, k) for k in FORMAT_KEYS}

    def chunk_layout(self) -> ChunkLayout:
        """The layout of the chunks written in this format."""
        if self.ec:
            return ChunkLayout(f"ec:{self.ec}", 1, self.block_format, None)
        return ChunkLayout("replicas", self.replicas, self.block_format, None)

    def to_record(self) -> dict[str, Any]:
        """The format as stored in the metadata: a setting at its old default is left out, so a
        release from before that setting can still read the volume's record."""
        record = asdict(self)
        if self.encryption == "none":
            del record["encryption"]  # a plain volume's record stays readable by the previous release
        if not self.ec:
            del record["ec"]  # a replicated volume's format stays readable by a release without erasure codes
        return record

    def describe(self) -> str:
        """One line for people: 'blocks 4 MiB, chunks 64 MiB, replicas 1, write quorum all, compression none'."""
        quorum = self.write_quorum or "all"
        redundancy = f"erasure code {self.ec}" if self.ec else f"replicas {self.replicas}"
        return (f"blocks {show_setting('block_size', self.block_size)}, chunks {show_setting('chunk_size', self.chunk_size)}, "
                f"{redundancy}, write quorum {quorum}, compression {self.compression}"
                + (f", encryption {self.encryption}" if self.encryption != "none" else ""))


def stored_format(store: Meta, fallback: VolumeFormat) -> VolumeFormat:
    """The volume's format, from its metadata store. A volume made before formats were stored
    adopts `fallback` and stores it: the format its host config names (an older release's TOML
    is the only source there is), with defaults for the rest, as that release read it, and the
    block format that release wrote."""
    record = store.read_format()
    if record is None:
        adopted = replace(fallback, block_format=SCHEMA2_BLOCK_FORMAT)
        record = store.write_format(adopted.to_record(), adopted.chunk_layout())  # another host may have been first
    return VolumeFormat.from_record(record)


def show_setting(key: str, value: object) -> str:
    """A format setting as people write it: sizes in the largest unit that divides them (16 KiB)."""
    if key in _SIZES and isinstance(value, int):
        for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if value and value % (1 << shift) == 0:
                return f"{value >> shift} {unit}"
        return f"{value} B"
    return str(value)


def refuse_format_options(volume: str, options: dict[str, Any]) -> None:
    """Refuse format settings among a caller's options (storage_options, Client.open): one line."""
    given = [k for k in FORMAT_KEYS if k in options]
    if given:
        raise ConfigError(f"volume {volume!r}: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} part of the "
                          "volume's format (stored in its metadata) and cannot be set per caller; it is fixed by `balefs init`")


def refuse_changed_format(volume: str, stored: VolumeFormat, stated: dict[str, Any], where: str) -> None:
    """Refuse a host config whose format settings (`stated`) differ from the stored format: one line."""
    for key in FORMAT_KEYS:
        if key in stated and stated[key] != getattr(stored, key):
            raise ConfigError(f"volume {volume!r}: {key} is part of the volume's format ({show_setting(key, getattr(stored, key))}, "
                              f"stored in its metadata) and cannot be changed in {where} (it says {show_setting(key, stated[key])})")
