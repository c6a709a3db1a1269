"""The volume's keys in its metadata: created at `init`, unwrapped on open, rewrapped by `key rotate`,
a new data key added by `rekey`.

The record (crypto.KeyRecord, JSON in the `meta` row `keys`) holds only data keys wrapped by the
master key, and the scrypt salt of a passphrase, or which of the key service's keys wraps them
(a PostgreSQL store keeps that key and releases it only under a valid grant: meta/pg_security.py);
every change is a compare-and-set of the whole row (Meta.swap_setting), so two hosts changing
keys at once never lose one's change.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .crypto import CIPHER, KEY_SERVICE_KDF, KeyAccessError, KeyRecord, Keyring, MasterSource, new_kdf, new_key
from .meta import Meta

KEYS = "keys"  # the meta row


def master_key(store: Meta, source: MasterSource, kdf: dict[str, Any]) -> bytes:
    """The master key of a stored record: released by the key service when the record says one
    holds it (PermissionError without a valid grant), else read from `source` on this host."""
    if kdf.get("kdf") == KEY_SERVICE_KDF:
        return store.release_wrapping_key(int(kdf["key_id"]))
    return source.master_key(kdf)


def new_master_key(store: Meta, source: MasterSource) -> tuple[bytes, dict[str, Any]]:
    """A new master key of `source` and the record's kdf for it; a key service's is made here
    and handed to the store, so it never touches this host's disk."""
    if source.key_service:
        key = new_key()
        return key, {"kdf": KEY_SERVICE_KDF, "service": source.key_service, "key_id": store.store_wrapping_key(key)}
    kdf = new_kdf(source)
    return source.master_key(kdf), kdf


def held_by_key_service(store: Meta) -> bool:
    """Whether the volume's master key is kept by its metadata store's key service."""
    text = store.read_setting(KEYS)
    return text is not None and KeyRecord.from_json(text).kdf.get("kdf") == KEY_SERVICE_KDF


def create_keys(store: Meta, source: MasterSource, volume: str) -> Keyring:
    """Make an encrypted volume's first data key, wrapped by the master key of `source`."""
    master, kdf = new_master_key(store, source)
    record = KeyRecord(kdf, 0)
    record.add(master, volume, new_key())
    if not store.swap_setting(KEYS, None, record.to_json()):
        raise ConfigError("the volume has keys already")
    return Keyring(volume, record.unwrap_all(master, volume), record.current)


def stored_record(store: Meta) -> tuple[KeyRecord, str]:
    """The stored key record and its text (for a compare-and-set)."""
    text = store.read_setting(KEYS)
    if text is None:
        raise ConfigError("the volume is encrypted but its metadata holds no keys (a damaged or partly copied store)")
    return KeyRecord.from_json(text), text


def open_keyring(store: Meta, source: MasterSource, volume: str) -> Keyring:
    """The volume's data keys in the clear; KeyAccessError naming what is wrong (the key, its file)."""
    record, _ = stored_record(store)
    master = master_key(store, source, record.kdf)
    try:
        return Keyring(volume, record.unwrap_all(master, volume), record.current)
    except KeyAccessError as exc:
        raise KeyAccessError(f"{exc} (the master key came from {source.describe()})") from None


def rotate_master(store: Meta, old: MasterSource, new: MasterSource, volume: str) -> None:
    """Wrap the data keys with a new master key (seconds: no block is touched)."""
    record, text = stored_record(store)
    try:
        master = master_key(store, old, record.kdf)
        new_master, kdf = new_master_key(store, new)
        fresh = record.rewrapped(master, new_master, volume, kdf)
    except KeyAccessError as exc:
        raise KeyAccessError(f"{exc} (the current master key came from {old.describe()})") from None
    if not store.swap_setting(KEYS, text, fresh.to_json()):
        raise ConfigError("the volume's keys changed meanwhile (another key operation): run it again")
    store.record_audit("key.rotate", "", detail=f"master key now from {new.describe()}")


def add_data_key(store: Meta, source: MasterSource, volume: str) -> int:
    """Make a new data key current (new chunks are sealed with it; older keys stay for the blocks
    still under them until `rekey` has moved every block); returns its number."""
    record, text = stored_record(store)
    master = master_key(store, source, record.kdf)
    record.unwrap_all(master, volume)  # a wrong master key is refused before anything is written
    number = record.add(master, volume, new_key())
    if not store.swap_setting(KEYS, text, record.to_json()):
        raise ConfigError("the volume's keys changed meanwhile (another key operation): run it again")
    store.record_audit("key.new-data-key", "", detail=f"data key {number}")
    return number


def drop_data_keys(store: Meta, keep: set[int]) -> list[int]:
    """Forget the wrapped data keys not in `keep` (no block is sealed under them any more)."""
    record, text = stored_record(store)
    gone = sorted(n for n in record.wrapped if n not in keep and n != record.current)
    if gone:
        for n in gone:
            record.wrapped.pop(n)
            record.created.pop(n, None)
        if not store.swap_setting(KEYS, text, record.to_json()):
            raise ConfigError("the volume's keys changed meanwhile (another key operation): run it again")
        store.record_audit("key.drop", "", detail=f"data keys {gone}")
    return gone


__all__ = ["CIPHER", "master_key", "new_master_key", "create_keys", "held_by_key_service", "open_keyring", "rotate_master", "add_data_key", "drop_data_keys", "stored_record"]
