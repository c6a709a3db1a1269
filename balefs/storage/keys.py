"""The volume's keys in its metadata: created at `init`, unwrapped on open, rewrapped by `key rotate`,
a new data key added by `rekey`.

The record (crypto.KeyRecord, JSON in the `meta` row `keys`) holds only data keys wrapped by the
master key, and the scrypt salt of a passphrase, or which of the key service's keys wraps each key
domain's data keys (kdf "domain_keys": prefix -> vault id; a PostgreSQL store keeps one wrapping key
per domain and releases it only under a valid grant covering that domain: meta/pg_security.py; a
record made before that names one "key_id" for every domain);
every change is a compare-and-set of the whole row (Meta.swap_setting), so two hosts changing
keys at once never lose one's change.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import ConfigError
from .crypto import (CIPHER, KEY_SERVICE_KDF, KeyAccessError, KeyRecord, Keyring, MasterSource, domain_of, new_kdf,
                     new_key)
from .meta import Meta
from .meta.types import split_path

KEYS = "keys"  # the meta row


def master_keys(store: Meta, source: MasterSource, record: KeyRecord,
                release: Callable[[str], bool] | None = None) -> dict[str, bytes]:
    """The keys wrapping each key domain's data keys ({prefix: key}, "" the root), of the domains
    `release` admits (None: all): released one domain at a time by the key service when the record
    says one holds them (PermissionError without a valid grant covering the domain), else the one
    master key read from `source` on this host."""
    domains = ["", *record.domains]
    if record.kdf.get("kdf") != KEY_SERVICE_KDF:
        key = source.master_key(record.kdf)
        return dict.fromkeys(domains, key)
    ids = record.kdf.get("domain_keys")
    if ids is None:  # keyed before per-domain keys: one wrapping key for every domain
        key = store.release_wrapping_key(int(record.kdf["key_id"]))
        return dict.fromkeys(domains, key)
    return {d: store.release_wrapping_key(int(ids[d])) for d in domains if release is None or release(d)}


def new_master_keys(store: Meta, source: MasterSource, domains: Sequence[str]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """New master keys of `source` for the root and `domains` and the record's kdf for them; a key
    service's (one per domain) are made here and handed to the store, so none touches this host's disk."""
    domains = ["", *domains]
    if source.key_service:
        keys = {d: new_key() for d in domains}
        ids = {d: store.store_wrapping_key(k, d) for d, k in keys.items()}
        return keys, {"kdf": KEY_SERVICE_KDF, "service": source.key_service, "key_id": ids[""], "domain_keys": ids}
    kdf = new_kdf(source)
    return dict.fromkeys(domains, source.master_key(kdf)), kdf


def held_by_key_service(store: Meta) -> bool:
    """Whether the volume's master key is kept by its metadata store's key service."""
    text = store.read_setting(KEYS)
    return text is not None and KeyRecord.from_json(text).kdf.get("kdf") == KEY_SERVICE_KDF


def create_keys(store: Meta, source: MasterSource, volume: str, domains: Sequence[str] = ()) -> Keyring:
    """Make an encrypted volume's first data key, and one for each key domain (a path prefix),
    wrapped by the master key of `source`."""
    domains = check_domains(domains)
    master, kdf = new_master_keys(store, source, domains)
    record = KeyRecord(kdf, 0)
    record.add(master, volume, new_key())
    for domain in domains:
        record.add(master, volume, new_key(), domain)
    if not store.swap_setting(KEYS, None, record.to_json()):
        raise ConfigError("the volume has keys already")
    return record.keyring(master, volume)


def check_domains(prefixes: Sequence[str], existing: Sequence[str] = ()) -> list[str]:
    """Key-domain prefixes as stored (no leading or trailing slash), refusing the root and repeats."""
    out: list[str] = []
    for p in prefixes:
        norm = "/".join(split_path(p))
        if not norm:
            raise ConfigError("--key-domain /: the volume's root is the volume's own key domain already; name a directory")
        if norm in out or norm in existing:
            raise ConfigError(f"--key-domain /{norm} is a key domain already")
        out.append(norm)
    return out


def released(prefixes: Sequence[str], grants: Sequence[str] | None) -> Callable[[str], bool] | None:
    """Which key domains a user's valid grants (their path prefixes; None: no grant applies, every
    key) release: a domain whose prefix a grant covers, and the domain a grant's prefix lies in."""
    if grants is None:
        return None
    open_to = {domain_of(g, prefixes) for g in grants}
    for g in grants:
        g = g.strip("/")
        open_to |= {d for d in prefixes if not g or d == g or d.startswith(g + "/")}
    return open_to.__contains__


def stored_record(store: Meta) -> tuple[KeyRecord, str]:
    """The stored key record and its text (for a compare-and-set)."""
    text = store.read_setting(KEYS)
    if text is None:
        raise ConfigError("the volume is encrypted but its metadata holds no keys (a damaged or partly copied store)")
    return KeyRecord.from_json(text), text


def open_keyring(store: Meta, source: MasterSource, volume: str, grants: Sequence[str] | None = None) -> Keyring:
    """The volume's data keys in the clear, of the key domains that the path prefixes of the user's
    valid `grants` release (None: every domain); KeyAccessError naming what is wrong (the key, its file)."""
    record, _ = stored_record(store)
    release = released(list(record.domains), grants)
    master = master_keys(store, source, record, release)  # the key service is asked for those domains only
    try:
        return record.keyring(master, volume, release)
    except KeyAccessError as exc:
        raise KeyAccessError(f"{exc} (the master key came from {source.describe()})") from None


def rotate_master(store: Meta, old: MasterSource, new: MasterSource, volume: str) -> None:
    """Wrap the data keys with a new master key (seconds: no block is touched)."""
    record, text = stored_record(store)
    try:
        master = master_keys(store, old, record)
        new_master, kdf = new_master_keys(store, new, list(record.domains))
        fresh = record.rewrapped(master, new_master, volume, kdf)
    except KeyAccessError as exc:
        raise KeyAccessError(f"{exc} (the current master key came from {old.describe()})") from None
    if not store.swap_setting(KEYS, text, fresh.to_json()):
        raise ConfigError("the volume's keys changed meanwhile (another key operation): run it again")
    store.record_audit("key.rotate", "", detail=f"master key now from {new.describe()}")


def add_data_key(store: Meta, source: MasterSource, volume: str, domain: str = "") -> int:
    """Make a new data key current in key domain `domain` (new chunks are sealed with it; older keys
    stay for the blocks still under them until `rekey` has moved every block); returns its number."""
    return add_data_keys(store, source, volume, [domain])[domain]


def add_data_keys(store: Meta, source: MasterSource, volume: str, domains: Sequence[str]) -> dict[str, int]:
    """add_data_key for several domains in one change of the key record; {domain: new key number}."""
    record, text = stored_record(store)
    master = master_keys(store, source, record, set(domains).__contains__)
    record.unwrap_all(master, volume, set(domains).__contains__)  # a wrong master key is refused before anything is written
    numbers = {d: record.add(master, volume, new_key(), d) for d in domains}
    if not store.swap_setting(KEYS, text, record.to_json()):
        raise ConfigError("the volume's keys changed meanwhile (another key operation): run it again")
    for d, n in numbers.items():
        store.record_audit("key.new-data-key", d, detail=f"data key {n}" + (f" of key domain /{d}" if d else ""))
    return numbers


def add_domain(store: Meta, source: MasterSource, volume: str, prefix: str) -> int:
    """Make path prefix `prefix` a key domain of its own (its first data key); returns the key's number."""
    record, text = stored_record(store)
    (domain,) = check_domains([prefix], list(record.domains))
    ids = record.kdf.get("domain_keys")
    if ids is not None:  # the key service keeps a wrapping key of the new domain's own
        master = {domain: new_key()}
        ids[domain] = store.store_wrapping_key(master[domain], domain)
    else:
        master = master_keys(store, source, record, "".__eq__)
        record.unwrap_all(master, volume, "".__eq__)  # a wrong master key is refused before anything is written
        master = {domain: master[""]}
    number = record.add(master, volume, new_key(), domain)
    if not store.swap_setting(KEYS, text, record.to_json()):
        raise ConfigError("the volume's keys changed meanwhile (another key operation): run it again")
    store.record_audit("key.new-data-key", domain, detail=f"data key {number} of key domain /{domain}")
    return number


def drop_data_keys(store: Meta, keep: set[int]) -> list[int]:
    """Forget the wrapped data keys not in `keep` (no block is sealed under them any more)."""
    record, text = stored_record(store)
    gone = sorted(n for n in record.wrapped if n not in keep and n not in record.currents().values())
    if gone:
        for n in gone:
            record.wrapped.pop(n)
            record.created.pop(n, None)
        if not store.swap_setting(KEYS, text, record.to_json()):
            raise ConfigError("the volume's keys changed meanwhile (another key operation): run it again")
        store.record_audit("key.drop", "", detail=f"data keys {gone}")
    return gone


__all__ = ["CIPHER", "master_keys", "new_master_keys", "create_keys", "held_by_key_service", "open_keyring",
           "rotate_master", "add_data_key", "add_data_keys", "add_domain", "drop_data_keys", "stored_record",
           "released", "check_domains"]
