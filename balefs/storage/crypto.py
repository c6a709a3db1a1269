"""Encryption at rest: master keys, the volume's data keys (stored only wrapped) and the AEAD
that seals block payloads.

Cipher: AES-256-GCM (`cryptography`: OpenSSL, AES-NI). A master key (32 bytes: a key file, an
environment variable, or a passphrase through scrypt) wraps the volume's data keys; only the
wrapped forms are stored, in the metadata (`meta` row `keys`, see KeyRecord). A volume has
one key domain today, the volume itself: one current data key, plus older ones while `rekey`
moves blocks off them.

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
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import ConfigError

CIPHER = "aes-256-gcm"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES  # what sealing adds to a payload
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
PASSPHRASE_ENV = "BALEFS_PASSPHRASE"  # where a passphrase-keyed volume's passphrase is read from


class KeyAccessError(ConfigError):
    """A volume's key cannot be had: wrong master key or passphrase, unreadable or unsafe key file."""


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

    def describe(self) -> str:
        return (f"key file {self.key_file}" if self.key_file else f"${self.key_env}" if self.key_env
                else "a passphrase")

    def master_key(self, kdf: dict[str, Any]) -> bytes:
        """The master key, with `kdf` the stored record's parameters (scrypt's salt)."""
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
    """The volume's key material as stored in its metadata: data keys wrapped by the master key."""

    kdf: dict[str, Any]
    current: int  # the data key new chunks are sealed with
    wrapped: dict[int, str] = field(default_factory=dict)  # data key number -> nonce + wrapped key, base64
    created: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"cipher": CIPHER, "kdf": self.kdf, "current": self.current,
                           "keys": {str(n): {"wrapped": w, "created": self.created.get(n, 0.0)} for n, w in self.wrapped.items()}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "KeyRecord":
        rec = json.loads(text)
        if rec.get("cipher") != CIPHER:
            raise ConfigError(f"the volume's cipher {rec.get('cipher')!r} is unknown to this balefs: upgrade balefs")
        keys = {int(n): k for n, k in rec["keys"].items()}
        return cls(rec["kdf"], int(rec["current"]), {n: k["wrapped"] for n, k in keys.items()},
                   {n: k["created"] for n, k in keys.items()})

    def add(self, master: bytes, volume: str, key: bytes) -> int:
        """Wrap a new data key and make it current; returns its number."""
        number = max(self.wrapped, default=0) + 1
        self.wrapped[number] = wrap(master, volume, number, key)
        self.created[number] = time.time()
        self.current = number
        return number

    def unwrap_all(self, master: bytes, volume: str) -> dict[int, bytes]:
        """Every data key in the clear; KeyAccessError if the master key is not this volume's."""
        return {n: unwrap(master, volume, n, w) for n, w in self.wrapped.items()}

    def rewrapped(self, old: bytes, new: bytes, volume: str, kdf: dict[str, Any]) -> "KeyRecord":
        """The same data keys wrapped by a new master key (key rotate: no block is touched)."""
        keys = self.unwrap_all(old, volume)
        return KeyRecord(kdf, self.current, {n: wrap(new, volume, n, k) for n, k in keys.items()}, dict(self.created))


def _wrap_aad(volume: str, number: int) -> bytes:
    return f"balefs-data-key/{volume}/{number}".encode()


def wrap(master: bytes, volume: str, number: int, key: bytes) -> str:
    nonce = os.urandom(NONCE_BYTES)
    return _b64(nonce + AESGCM(master).encrypt(nonce, key, _wrap_aad(volume, number)))


def unwrap(master: bytes, volume: str, number: int, wrapped: str) -> bytes:
    blob = _unb64(wrapped)
    try:
        return AESGCM(master).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _wrap_aad(volume, number))
    except InvalidTag:
        raise KeyAccessError("wrong master key or passphrase: it does not unwrap this volume's data keys") from None


class Keyring:
    """A volume's data keys in the clear, and the chunk keys derived from them (see the module doc)."""

    _CACHE_MAX = 4096

    def __init__(self, volume: str, keys: dict[int, bytes], current: int) -> None:
        self.volume, self.keys, self.current = volume, dict(keys), current
        self._aeads: dict[tuple[int, int], AESGCM] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a loader's workers get the keys, not the cipher objects
        return {"volume": self.volume, "keys": self.keys, "current": self.current}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["volume"], state["keys"], state["current"])  # type: ignore[misc]

    def chunk_aead(self, number: int, chunk: int) -> AESGCM:
        """The AEAD of chunk `chunk` under data key `number` (KeyError if the volume has no such key)."""
        got = self._aeads.get((number, chunk))
        if got is None:
            data_key = self.keys[number]
            derived = HKDF(hashes.SHA256(), KEY_BYTES, salt=None,
                           info=b"balefs-chunk-key/" + chunk.to_bytes(8, "little")).derive(data_key)
            got = AESGCM(derived)
            with self._lock:
                if len(self._aeads) >= self._CACHE_MAX:
                    self._aeads.clear()
                self._aeads[(number, chunk)] = got
        return got

    def seal(self, number: int, chunk: int, payload: bytes | memoryview, aad: bytes) -> bytes:
        """nonce + ciphertext + tag of `payload` under the chunk key, a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self.chunk_aead(number, chunk).encrypt(nonce, payload, aad)

    def seal_into(self, number: int, chunk: int, payload: bytes | memoryview, aad: bytes, out: memoryview) -> int:
        """seal() written into `out` (at least len(payload) + OVERHEAD bytes), no copy made; returns its length."""
        nonce = os.urandom(NONCE_BYTES)
        end = NONCE_BYTES + len(payload) + TAG_BYTES
        out[:NONCE_BYTES] = nonce
        self.chunk_aead(number, chunk).encrypt_into(nonce, payload, aad, out[NONCE_BYTES:end])
        return end

    def open(self, number: int, chunk: int, sealed: bytes | memoryview, aad: bytes) -> bytes:
        """The payload sealed by seal(); InvalidTag if anything (bytes, identity, key) is off."""
        return self.chunk_aead(number, chunk).decrypt(bytes(sealed[:NONCE_BYTES]), sealed[NONCE_BYTES:], aad)

    def open_into(self, number: int, chunk: int, sealed: bytes | memoryview, aad: bytes, out: memoryview) -> None:
        """open() written into `out` (exactly the payload's length), no copy made: a bulk load decrypts
        straight into its tensors. On InvalidTag `out` holds garbage, never data to use."""
        self.chunk_aead(number, chunk).decrypt_into(bytes(sealed[:NONCE_BYTES]), sealed[NONCE_BYTES:], aad, out)

    def cache_sealer(self) -> "CacheSealer":
        return CacheSealer(self)


class CacheSealer:
    """Seals entries of the local disk cache, so a stolen cache disk reveals nothing: each under
    the current data key's chunk key of its chunk, its identity (volume, chunk, index) as AAD."""

    overhead = OVERHEAD

    def __init__(self, keyring: Keyring) -> None:
        self._ring = keyring

    def _aad(self, key: tuple[int, int]) -> bytes:
        return f"balefs-disk-cache/{self._ring.volume}/{key[0]}/{key[1]}".encode()

    def seal(self, key: tuple[int, int], data: bytes | memoryview) -> bytes:
        return self._ring.seal(self._ring.current, key[0], data, self._aad(key))

    def unseal(self, key: tuple[int, int], blob: bytes | memoryview) -> bytes | None:
        """The entry's plaintext, or None if it does not open (damaged, or sealed before a rekey)."""
        try:
            return self._ring.open(self._ring.current, key[0], blob, self._aad(key))
        except (InvalidTag, ValueError):
            return None
