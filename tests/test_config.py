"""Volume configs: TOML files under $BALEFS_HOME, clear errors naming the file, init refusing to clobber."""
from __future__ import annotations

from pathlib import Path

import pytest

from balefs.errors import ConfigError, VolumeExistsError, VolumeNotFoundError
from balefs.storage.client import Client
from balefs.storage import config as config_mod
from balefs.storage.config import VolumeConfig, load_config, parse_size, save_config
from balefs.storage.volume_format import FORMAT_KEYS

from helpers import BLOCK, CHUNK


def write_config(home: Path, name: str, text: str) -> Path:
    path = home / f"{name}.toml"
    path.write_text(text)
    return path


def test_home_from_environment(balefs_home: Path) -> None:
    assert config_mod.balefs_home() == str(balefs_home)


def test_unknown_volume(balefs_home: Path) -> None:
    with pytest.raises(VolumeNotFoundError) as info:
        Client.open("nosuchvol")
    assert isinstance(info.value, FileNotFoundError)
    assert "nosuchvol" in str(info.value)
    assert str(balefs_home) in str(info.value)
    assert info.value.name == "nosuchvol"


def test_init_writes_readable_config(volume, balefs_home: Path, open_client) -> None:
    path = balefs_home / "vol.toml"
    text = path.read_text()
    assert "nodes = [" in text and "kept in its metadata" in text
    assert not any(f"{key} =" in text for key in FORMAT_KEYS)  # the format is the metadata's
    cfg = load_config("vol")
    assert cfg == volume.without_format()
    assert (cfg.block_size, cfg.chunk_size, cfg.replicas) == (None, None, None)
    assert open_client("vol").cfg == volume
    assert (volume.block_size, volume.chunk_size, volume.replicas) == (BLOCK, CHUNK, 1)
    assert cfg.meta_url == f"sqlite://{balefs_home / 'vol.db'}"
    assert (balefs_home / "vol.db").exists()


@pytest.mark.parametrize("text,needle", [
    ("nodes = [\n", "not valid TOML"),
    ("nodes = ['/tmp'\nblock_size = 4096", "not valid TOML"),
    ("this is not toml", "not valid TOML"),
    ('nodes = ["/tmp"]\nblocksize = "4MiB"\n', "unknown key(s) blocksize"),
    ('nodes = ["/tmp"]\nname = "other"\n', "unknown key(s) name"),
    ('block_size = "4MiB"\n', "'nodes' must be a list"),
    ('nodes = "/tmp"\n', "'nodes' must be a list"),
    ('nodes = [1, 2]\n', "node"),
    ('nodes = []\n', "no nodes"),
    ('nodes = ["/tmp"]\nblock_size = "lots"\n', "block_size"),
    ('nodes = ["/tmp"]\nblock_size = "-4MiB"\n', "block_size"),
    ('nodes = ["/tmp"]\nblock_size = 1000\n', "block_size 1000"),
    ('nodes = ["/tmp"]\nblock_size = "2GiB"\nchunk_size = "4GiB"\n', "block_size"),
    ('nodes = ["/tmp"]\nblock_size = "64KiB"\nchunk_size = "100KiB"\n', "multiple of block_size"),
    ('nodes = ["/tmp"]\nblock_size = "64KiB"\nchunk_size = "32KiB"\n', "multiple of block_size"),
    ('nodes = ["/tmp"]\ncache_size = "big"\n', "cache_size"),
    ('nodes = ["/tmp"]\nreplicas = 2\n', "replicas=2"),
    ('nodes = ["/tmp"]\nreplicas = "two"\n', "replicas"),
    ('nodes = ["/tmp", "/var"]\nreplicas = 1.5\n', "replicas"),
    ('nodes = ["/tmp"]\nio_threads = "many"\n', "io_threads"),
    ('nodes = ["/tmp"]\nio_threads = 0\n', "io_threads"),
    ('nodes = ["/tmp"]\ncompression = "zstd"\n', "compression"),
    ('nodes = ["/tmp"]\nmeta_cache_ttl = "soon"\n', "meta_cache_ttl"),
    ('nodes = ["/tmp", "/tmp"]\n', "listed twice"),
    ('nodes = ["ftp://bucket"]\n', "unsupported scheme"),
])
def test_malformed_config_is_config_error_naming_file(balefs_home: Path, text: str, needle: str) -> None:
    path = write_config(balefs_home, "bad", text)
    with pytest.raises(ConfigError) as info:
        load_config("bad")
    msg = str(info.value)
    assert str(path) in msg
    assert needle in msg
    with pytest.raises(ConfigError):
        Client.open("bad")


def test_sizes_with_units_in_config(balefs_home: Path) -> None:
    write_config(balefs_home, "units", 'nodes = ["/tmp"]\nblock_size = "64KiB"\nchunk_size = "2M"\ncache_size = "1.5g"\n')
    cfg = load_config("units")
    assert (cfg.block_size, cfg.chunk_size, cfg.cache_size) == (64 << 10, 2 << 20, int(1.5 * (1 << 30)))


@pytest.mark.parametrize("text,expected", [
    (4194304, 4194304), ("4194304", 4194304), ("4MiB", 4 << 20), ("4MB", 4 << 20), ("4m", 4 << 20),
    ("64K", 64 << 10), ("64 KiB", 64 << 10), ("1.5g", 3 << 29), ("2TiB", 2 << 40), ("512b", 512), ("7", 7),
])
def test_parse_size(text, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4 MiBs", "-1", "4XB", "1e6", "MiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--block-size"):
        parse_size(text, "--block-size")


@pytest.mark.parametrize("name", ["", "-lead", "has space", "a/b", "x" * 64, "..", "é"])
def test_bad_volume_name(name: str, node_dirs) -> None:
    with pytest.raises(ConfigError, match="volume name"):
        Client.init(name, [str(node_dirs(1)[0])])


def test_init_refuses_existing_volume(volume, balefs_home: Path, node_dirs) -> None:
    before = (balefs_home / "vol.toml").read_bytes()
    with pytest.raises(VolumeExistsError) as info:
        Client.init("vol", [str(d) for d in node_dirs(2, "other")])
    assert isinstance(info.value, FileExistsError)
    assert str(balefs_home / "vol.toml") in str(info.value)
    assert (balefs_home / "vol.toml").read_bytes() == before
    with pytest.raises(VolumeExistsError):
        save_config(volume)
    assert load_config("vol") == volume.without_format()


def test_init_refuses_existing_metadata(balefs_home: Path, node_dirs) -> None:
    (balefs_home / "v.db").write_bytes(b"")
    with pytest.raises(VolumeExistsError, match="v.db"):
        Client.init("v", [str(node_dirs(1)[0])])
    assert not (balefs_home / "v.toml").exists()


def test_metadata_file_missing(volume, balefs_home: Path) -> None:
    (balefs_home / "vol.db").unlink()
    with pytest.raises(ConfigError, match="vol.db"):
        Client.open("vol")


def test_options_override_config(volume, open_client) -> None:
    c = open_client("vol", cache_size="8MiB", readahead_blocks=0)
    assert c.cfg.cache_size == 8 << 20
    assert c.cache.capacity == 8 << 20
    assert c.cfg.readahead_blocks == 0
    assert load_config("vol").cache_size == volume.cache_size  # the file is unchanged


def test_unknown_option_refused(volume) -> None:
    with pytest.raises(ConfigError, match="bogus"):
        Client.open("vol", bogus=1)


def test_bad_option_value_refused(volume) -> None:
    with pytest.raises(ConfigError, match="io_threads must be positive"):
        Client.open("vol", io_threads=0)
    with pytest.raises(ConfigError, match="block_size is part of the volume's format .* cannot be set per caller"):
        Client.open("vol", block_size="3KiB")  # refused whatever its value (test_format.py)


def test_config_round_trips_through_toml(balefs_home: Path, node_dirs) -> None:
    dirs = [str(d) for d in node_dirs(3)]
    cfg = VolumeConfig(name="rt", nodes=dirs, replicas=2, compression="lz4", block_size="128KiB", chunk_size="4MiB",
                       cache_size="16MiB", readahead_blocks=2, io_threads=4, upload_inflight=8)
    save_config(cfg)
    assert load_config("rt") == cfg


def test_parse_bale_url_one_rule_for_every_entry_point():
    """The CLI, the loaders and the checkpointer split bale:// URLs with this one function."""
    from balefs.storage.config import parse_bale_url
    assert parse_bale_url("bale://v/a//b/") == ("v", "a/b")
    assert parse_bale_url("v/./a") == ("v", "a")
    assert parse_bale_url("bale://v") == ("v", "")
    for bad in ("bale://", "", "/"):
        with pytest.raises(ValueError, match="expected bale://VOLUME/path"):
            parse_bale_url(bad)
    with pytest.raises(ValueError, match="'..' is not allowed"):
        parse_bale_url("bale://v/a/../b")
