"""Encryption at rest: master keys, the volume's data keys (stored only wrapped) and the AEAD
that seals block payloads.

Cipher: AES-256-GCM (the native engine's libipsec-mb where it is built, else `cryptography`'s OpenSSL; AES-NI). A master key (32 bytes: a key file, an
environment variable, or a passphrase through scrypt) wraps the volume's data keys; only the
wrapped forms are stored, in the metadata (`meta` row `keys`, see KeyRecord). Data keys belong
to key domains: the volume itself (prefix "") and any path prefix made a domain of its own
(`init --key-domain`, `mkdir --key-domain`); each domain has one current data key, plus older
ones while `rekey` moves blocks off them. A chunk holds files of one domain only and is sealed
under its domain's key (Keyring.bind / sealing_key), so releasing one domain's key (a grant on
that prefix) reveals no other domain's bytes. A domain key's wrap has its prefix in the
associated data, so a wrapped key cannot be relabelled to another domain.

Nonces are never reused under one key: a block is sealed under a *chunk key*, derived with
HKDF-SHA256 from the data key and the chunk id (ids come from the metadata's sequence and are
never reused), with a fresh random 96-bit nonce for every encryption. A chunk key seals only
its chunk's blocks and their rewrites (gc compaction and recovery write new chunks or encrypt
afresh; rebalance, repair and fsck copy ciphertext as it is, which reuses nothing), a few
thousand encryptions at most, so the chance of two equal random nonces under one chunk key is
below 2^-70, and across 2^32 chunks below 2^-38. No counter has to be shared between writers
on different hosts.
"""
from __future__ import annotations

import base64
import errno
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import ConfigError
from . import native

CIPHER = "aes-256-gcm"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES  # what sealing adds to a payload
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
PASSPHRASE_ENV = "BALEFS_PASSPHRASE"  # where a passphrase-keyed volume's passphrase is read from
KEY_SERVICE_KDF = "key-service"  # a KeyRecord's kdf when a key service holds the master keys ("domain_keys": which)
KEY_SERVICES = ("pg",)
#: a master key for every key domain, or the wrapping keys by domain prefix ("" the volume's root):
#: a key service keeps one per domain, so it can release one domain's without the others'
Masters = Union[bytes, Mapping[str, bytes]]


class KeyAccessError(ConfigError):
    """A volume's key cannot be had: wrong master key or passphrase, unreadable or unsafe key file."""


class KeyWithheld(PermissionError):
    """A key domain's data key was not released to this client (no valid grant here covers the domain)."""

    def __init__(self, domain: str, what: str = "") -> None:
        super().__init__(errno.EACCES, f"permission denied: the data key of key domain /{domain} is not released to "
                                       "this client (no valid grant here covers it)", what or f"/{domain}")
        self.domain = domain


class PassphraseRequired(KeyAccessError):
    """The volume is keyed by a passphrase and none was given (the CLI prompts for it on a terminal)."""

    def __init__(self, env: str) -> None:
        super().__init__(f"the volume is keyed by a passphrase: set ${env} (the CLI prompts for it on a terminal)")
        self.env = env


def new_key() -> bytes:
    """32 random bytes: a master or data key."""
    return os.urandom(KEY_BYTES)


def write_key_file(path: str) -> None:
    """Write a new random master key to `path` (mode 0600), refusing to overwrite a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyAccessError(f"key file {path} exists already; remove it or name another") from None
    with os.fdopen(fd, "wb") as f:
        f.write(new_key())


def read_key_file(path: str) -> bytes:
    """The 32-byte master key in `path`; refused if group or world may read it, or if it is not 32 bytes."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read(KEY_BYTES + 1)
    except OSError as exc:
        raise KeyAccessError(f"key file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyAccessError(f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may read it; "
                             f"run `chmod 600 {path}`")
    if len(key) != KEY_BYTES:
        raise KeyAccessError(f"key file {path} holds {len(key)} bytes; a master key is exactly {KEY_BYTES} "
                             "(make one with `balefs key new PATH` or `head -c 32 /dev/urandom`)")
    return key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


@dataclass(frozen=True)
class MasterSource:
    """Where a volume's master key comes from on this host: a key file, an environment variable
    (32 bytes, base64 or hex) or a passphrase (read from $BALEFS_PASSPHRASE, stretched by scrypt)."""

    key_file: str = ""
    key_env: str = ""
    passphrase: bool = False
    passphrase_env: str = PASSPHRASE_ENV  # the variable a passphrase is read from
    key_service: str = ""  # "pg": the metadata store holds the key and releases it under a grant (keys.py)

    def describe(self) -> str:
        if self.key_service:
            return f"the {self.key_service} key service"
        return (f"key file {self.key_file}" if self.key_file else f"${self.key_env}" if self.key_env
                else "a passphrase")

    def master_key(self, kdf: dict[str, Any]) -> bytes:
        """The master key, with `kdf` the stored record's parameters (scrypt's salt)."""
        if self.key_service or kdf.get("kdf") == KEY_SERVICE_KDF:
            raise KeyAccessError("the volume's master key is held by its key service (keys.master_keys asks it)")
        if self.key_file:
            return read_key_file(self.key_file)
        if self.key_env:
            text = os.environ.get(self.key_env)
            if not text:
                raise KeyAccessError(f"the master key's variable ${self.key_env} is not set")
            return _decode_env_key(self.key_env, text.strip())
        if self.passphrase:
            phrase = os.environ.get(self.passphrase_env)
            if not phrase:
                raise PassphraseRequired(self.passphrase_env)
            if kdf.get("kdf") != "scrypt":
                raise KeyAccessError("the volume's key is not a passphrase's: name its key file or variable instead")
            return Scrypt(salt=_unb64(kdf["salt"]), length=KEY_BYTES, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(phrase.encode())
        raise KeyAccessError("the volume is encrypted and this host names no key: give --key-file, --key-env or --passphrase")


def _decode_env_key(var: str, text: str) -> bytes:
    for decode in (bytes.fromhex, _unb64):
        try:
            key = decode(text)
        except ValueError:
            continue
        if len(key) == KEY_BYTES:
            return key
    raise KeyAccessError(f"${var} must hold a {KEY_BYTES}-byte key as hex or base64")


def new_kdf(source: MasterSource) -> dict[str, Any]:
    """The stored key-derivation parameters for a new master key of `source`."""
    if source.passphrase:
        return {"kdf": "scrypt", "salt": _b64(os.urandom(16)), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    return {"kdf": "none"}


@dataclass
class KeyRecord:
    """The volume's key material as stored in its metadata: data keys wrapped by the master key,
    each in a key domain (a path prefix; "" the volume's own)."""

    kdf: dict[str, Any]
    current: int  # the data key new chunks of the volume's own domain are sealed with
    wrapped: dict[int, str] = field(default_factory=dict)  # data key number -> nonce + wrapped key, base64
    created: dict[int, float] = field(default_factory=dict)
    domains: dict[str, int] = field(default_factory=dict)  # path prefix of a key domain -> its current data key
    owner: dict[int, str] = field(default_factory=dict)  # data key number -> its domain's prefix (absent: the volume's)

    def to_json(self) -> str:
        keys = {str(n): {"wrapped": w, "created": self.created.get(n, 0.0), **({"domain": self.owner[n]} if n in self.owner else {})}
                for n, w in self.wrapped.items()}
        return json.dumps({"cipher": CIPHER, "kdf": self.kdf, "current": self.current, "keys": keys,
                           **({"domains": self.domains} if self.domains else {})}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "KeyRecord":
        rec = json.loads(text)
        if rec.get("cipher") != CIPHER:
            raise ConfigError(f"the volume's cipher {rec.get('cipher')!r} is unknown to this balefs: upgrade balefs")
        keys = {int(n): k for n, k in rec["keys"].items()}
        return cls(rec["kdf"], int(rec["current"]), {n: k["wrapped"] for n, k in keys.items()},
                   {n: k["created"] for n, k in keys.items()}, {d: int(n) for d, n in rec.get("domains", {}).items()},
                   {n: k["domain"] for n, k in keys.items() if k.get("domain")})

    def currents(self) -> dict[str, int]:
        """Every key domain's current data key, the volume's own ("") included."""
        return {"": self.current, **self.domains}

    def add(self, master: Masters, volume: str, key: bytes, domain: str = "") -> int:
        """Wrap a new data key and make it its domain's current key; returns its number."""
        number = max(self.wrapped, default=0) + 1
        self.wrapped[number] = wrap(master_of(master, domain), volume, number, key, domain)
        self.created[number] = time.time()
        if domain:
            self.owner[number] = domain
            self.domains[domain] = number
        else:
            self.current = number
        return number

    def unwrap_all(self, master: Masters, volume: str, release: Callable[[str], bool] | None = None) -> dict[int, bytes]:
        """The data keys in the clear (only those of the domains `release` admits, when given, and
        `master` has a key of); KeyAccessError if a master key is not this volume's."""
        out = {}
        for n, w in self.wrapped.items():
            domain = self.owner.get(n, "")
            if (release is None or release(domain)) and (isinstance(master, bytes) or domain in master):
                out[n] = unwrap(master_of(master, domain), volume, n, w, domain)
        return out

    def rewrapped(self, old: Masters, new: Masters, volume: str, kdf: dict[str, Any]) -> "KeyRecord":
        """The same data keys (of every domain) wrapped by new master keys (key rotate: no block is touched)."""
        keys = self.unwrap_all(old, volume)
        return KeyRecord(kdf, self.current, {n: wrap(master_of(new, self.owner.get(n, "")), volume, n, k, self.owner.get(n, ""))
                                             for n, k in keys.items()}, dict(self.created), dict(self.domains), dict(self.owner))

    def keyring(self, master: Masters, volume: str, release: Callable[[str], bool] | None = None) -> "Keyring":
        """The Keyring of the released domains' keys (every domain's numbers known, for the errors)."""
        return Keyring(volume, self.unwrap_all(master, volume, release), self.current, self.domains,
                       {n: self.owner.get(n, "") for n in self.wrapped})


def master_of(master: Masters, domain: str) -> bytes:
    """The key that wraps `domain`'s data keys."""
    return master if isinstance(master, bytes) else master[domain]


def _wrap_aad(volume: str, number: int, domain: str = "") -> bytes:
    return f"balefs-data-key/{volume}/{number}".encode() + (f"/domain/{domain}".encode() if domain else b"")


def wrap(master: bytes, volume: str, number: int, key: bytes, domain: str = "") -> str:
    nonce = os.urandom(NONCE_BYTES)
    return _b64(nonce + AESGCM(master).encrypt(nonce, key, _wrap_aad(volume, number, domain)))


def unwrap(master: bytes, volume: str, number: int, wrapped: str, domain: str = "") -> bytes:
    blob = _unb64(wrapped)
    try:
        return AESGCM(master).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _wrap_aad(volume, number, domain))
    except InvalidTag:
        raise KeyAccessError("wrong master key or passphrase: it does not unwrap this volume's data keys") from None


def domain_of(path: str, prefixes: "Iterable[str]") -> str:
    """The key domain of a volume path: the longest domain prefix holding it ("" : the volume's own)."""
    path = path.strip("/")
    best = ""
    for p in prefixes:
        if p and len(p) > len(best) and (path == p or path.startswith(p + "/")):
            best = p
    return best


class Keyring:
    """A volume's data keys in the clear (those released to this client), and the chunk keys
    derived from them (see the module doc); which domain each chunk is sealed in."""

    _CACHE_MAX = 4096

    def __init__(self, volume: str, keys: dict[int, bytes], current: int, domains: dict[str, int] | None = None,
                 key_domains: dict[int, str] | None = None) -> None:
        self.volume, self.keys, self.current = volume, dict(keys), current
        self.domains = {**(domains or {}), "": current}  # prefix -> the domain's current data key
        self.key_domains = dict(key_domains) if key_domains is not None else {n: "" for n in keys}  # number -> prefix
        self.prefixes = sorted((d for d in self.domains if d), key=len, reverse=True)
        #: chunk -> its key domain, for chunks this client writes (bind) or has opened blocks of
        self._chunk_domain: dict[int, str] = {}
        #: the data key number a chunk's layout records, for a chunk this client knows nothing of (set by the client)
        self.chunk_key_id: Callable[[int], int | None] | None = None
        self._aeads: dict[tuple[int, int], AESGCM] = {}
        self._chunk_keys: dict[tuple[int, int], bytes] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a loader's workers get the keys, not the cipher objects
        return {"volume": self.volume, "keys": self.keys, "current": self.current, "domains": self.domains,
                "key_domains": self.key_domains}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["volume"], state["keys"], state["current"], state.get("domains"),  # type: ignore[misc]
                      state.get("key_domains"))

    @property
    def has_domains(self) -> bool:
        """Whether the volume has key domains besides its own."""
        return bool(self.prefixes)

    def domain_of(self, path: str) -> str:
        """The key domain of a volume path ("" : the volume's own)."""
        return domain_of(path, self.prefixes) if self.prefixes else ""

    def key_for(self, domain: str, what: str = "") -> int:
        """The current data key of `domain`; KeyWithheld if it was not released to this client."""
        number = self.domains[domain]
        if number not in self.keys:
            raise KeyWithheld(domain, what)
        return number

    def bind(self, chunk: int, domain: str) -> None:
        """Chunk `chunk` holds files of `domain` (a chunk this client opened for writing)."""
        if self.prefixes:
            with self._lock:
                if len(self._chunk_domain) >= self._CACHE_MAX * 16:
                    self._chunk_domain.clear()
                self._chunk_domain[chunk] = domain

    def opened(self, chunk: int, number: int) -> None:
        """A block of `chunk` sealed under data key `number` was opened: the chunk is in that key's domain."""
        if self.prefixes and chunk not in self._chunk_domain:
            self.bind(chunk, self.key_domains.get(number, ""))

    def sealing_key(self, chunk: int) -> int:
        """The data key a block of `chunk` is sealed under now: its domain's current key."""
        if not self.prefixes:
            return self.current
        domain = self._chunk_domain.get(chunk)
        if domain is None:
            number = self.chunk_key_id(chunk) if self.chunk_key_id is not None else None
            if number is None:
                raise ConfigError(f"chunk {chunk}: its key domain is unknown to this client (it holds no record of it)")
            domain = self.key_domains.get(number, "")
            self.bind(chunk, domain)
        return self.key_for(domain, f"chunk {chunk}")

    def chunk_key(self, number: int, chunk: int) -> bytes:
        """The 32-byte key of chunk `chunk` under data key `number`, cached (KeyError if the volume has no
        such key): what the AEAD uses, and what the native block engine is given to open sealed blocks."""
        got = self._chunk_keys.get((number, chunk))
        if got is None:
            got = HKDF(hashes.SHA256(), KEY_BYTES, salt=None,
                       info=b"balefs-chunk-key/" + chunk.to_bytes(8, "little")).derive(self.keys[number])
            with self._lock:
                if len(self._chunk_keys) >= self._CACHE_MAX:
                    self._chunk_keys.clear()
                self._chunk_keys[(number, chunk)] = got
        return got

    def chunk_aead(self, number: int, chunk: int) -> AESGCM:
        """The AEAD of chunk `chunk` under data key `number` (KeyError if the volume has no such key)."""
        got = self._aeads.get((number, chunk))
        if got is None:
            got = AESGCM(self.chunk_key(number, chunk))
            with self._lock:
                if len(self._aeads) >= self._CACHE_MAX:
                    self._aeads.clear()
                self._aeads[(number, chunk)] = got
        return got

    # Sealing and opening go through the native block engine where it is built (libipsec-mb: 1.6-1.8x
    # the rate of the wheel's OpenSSL here), else the `cryptography` AEAD:
    # the same bytes either way (tests/test_native.py holds them equal).

    def seal(self, number: int, chunk: int, payload: bytes | memoryview, aad: bytes) -> bytes:
        """nonce + ciphertext + tag of `payload` under the chunk key, a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        if native.engine is not None:
            return native.seal(self.chunk_key(number, chunk), nonce, aad, payload)  # type: ignore[return-value]
        return nonce + self.chunk_aead(number, chunk).encrypt(nonce, payload, aad)

    def seal_into(self, number: int, chunk: int, payload: bytes | memoryview, aad: bytes, out: memoryview) -> int:
        """seal() written into `out` (at least len(payload) + OVERHEAD bytes), no copy made; returns its length."""
        nonce = os.urandom(NONCE_BYTES)
        if native.engine is not None:
            return native.seal(self.chunk_key(number, chunk), nonce, aad, payload, out)  # type: ignore[return-value]
        end = NONCE_BYTES + len(payload) + TAG_BYTES
        out[:NONCE_BYTES] = nonce
        self.chunk_aead(number, chunk).encrypt_into(nonce, payload, aad, out[NONCE_BYTES:end])
        return end

    def open(self, number: int, chunk: int, sealed: bytes | memoryview, aad: bytes) -> bytes:
        """The payload sealed by seal(); InvalidTag if anything (bytes, identity, key) is off."""
        if native.engine is not None:
            return native.open_sealed(self.chunk_key(number, chunk), sealed, aad)  # type: ignore[return-value]
        return self.chunk_aead(number, chunk).decrypt(bytes(sealed[:NONCE_BYTES]), sealed[NONCE_BYTES:], aad)

    def open_into(self, number: int, chunk: int, sealed: bytes | memoryview, aad: bytes, out: memoryview) -> None:
        """open() written into `out` (exactly the payload's length), no copy made: a bulk load decrypts
        straight into its tensors. On InvalidTag `out` holds garbage, never data to use."""
        if native.engine is not None:
            native.open_sealed(self.chunk_key(number, chunk), sealed, aad, out)
            return
        self.chunk_aead(number, chunk).decrypt_into(bytes(sealed[:NONCE_BYTES]), sealed[NONCE_BYTES:], aad, out)

    def cache_sealer(self) -> "CacheSealer":
        return CacheSealer(self)


class CacheSealer:
    """Seals entries of the local disk cache, so a stolen cache disk reveals nothing: each under
    its chunk's chunk key of its domain's current data key (named in the entry's first two bytes),
    its identity (volume, chunk, index) as AAD. A process without that domain's key (another user
    of the host's shared cache) cannot open it: a miss, then the grant check on the nodes' copy."""

    overhead = OVERHEAD + 2

    def __init__(self, keyring: Keyring) -> None:
        self._ring = keyring

    def _aad(self, key: tuple[int, int]) -> bytes:
        return f"balefs-disk-cache/{self._ring.volume}/{key[0]}/{key[1]}".encode()

    def seal(self, key: tuple[int, int], data: bytes | memoryview) -> bytes:
        number = self._ring.sealing_key(key[0])
        return number.to_bytes(2, "little") + self._ring.seal(number, key[0], data, self._aad(key))

    def unseal(self, key: tuple[int, int], blob: bytes | memoryview) -> bytes | None:
        """The entry's plaintext, or None if it does not open (damaged, sealed under a key this
        client does not hold, or before a rekey dropped its key)."""
        number = int.from_bytes(bytes(blob[:2]), "little")
        if number not in self._ring.keys:
            return None
        try:
            return self._ring.open(number, key[0], blob[2:], self._aad(key))
        except (InvalidTag, ValueError):
            return None
