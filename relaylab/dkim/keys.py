"""DKIM private keys: parsed once, re-read only when the file changes on disk."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaylab.policy.model import DkimAlgorithm, DkimKeyRef

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_BITS = 1024  # RFC 8301: verifiers must reject smaller keys


class KeyLoadError(Exception):
    """A key file that is missing, unreadable, malformed or of the wrong type."""


def parse_private_key(data: bytes, algorithm: DkimAlgorithm) -> PrivateKey:
    text = data.strip()
    try:
        if algorithm is DkimAlgorithm.ED25519_SHA256 and not text.startswith(b"-----"):
            # dkimpy/dknewkey style: base64 of the 32-byte seed.
            seed = base64.b64decode(text, validate=True)
            return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        key = serialization.load_pem_private_key(text, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyLoadError(f"not a usable {algorithm.value} private key ({e})") from None
    if algorithm is DkimAlgorithm.RSA_SHA256:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyLoadError(f"expected an RSA private key, got {type(key).__name__}")
        if key.key_size < MIN_RSA_BITS:
            raise KeyLoadError(f"RSA key of {key.key_size} bits is too short (min {MIN_RSA_BITS})")
        return key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyLoadError(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_private_key(path: Path, algorithm: DkimAlgorithm) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyLoadError(f"cannot read key file {path}: {e.strerror or e}") from None
    try:
        return parse_private_key(data, algorithm)
    except KeyLoadError as e:
        raise KeyLoadError(f"{path}: {e}") from None


def public_key_b64(key: PrivateKey) -> str:
    """The p= value of the DNS record: SPKI DER for RSA, the raw key for Ed25519 (RFC 8463)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def dns_record_value(key: PrivateKey) -> str:
    kind = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
    return f"v=DKIM1; k={kind}; p={public_key_b64(key)}"


@attrs.frozen
class SigningKey:
    ref: DkimKeyRef
    key: PrivateKey


@attrs.frozen
class _Cached:
    stamp: tuple[int, int, int, int, int]
    key: SigningKey


class KeyStore:
    """Parses each key file once (PEM parsing costs as much as hashing a message) and
    notices on the next message when a file is replaced, removed or corrupted: a stat per
    key per message is the price of never signing with a key the operator has withdrawn.

    The stamp includes the inode's change time, which chmod and chown set too: a key
    whose permissions changed is opened again, as this process's user, so a key the
    service may no longer read tempfails its domain now, not at the next restart."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Path, DkimAlgorithm], _Cached] = {}

    def get(self, ref: DkimKeyRef) -> SigningKey:
        try:
            st = os.stat(ref.path)
        except OSError as e:
            raise KeyLoadError(f"cannot read key file {ref.path}: {e.strerror or e}") from None
        stamp = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        cached = self._cache.get((ref.path, ref.algorithm))
        if cached is not None and cached.stamp == stamp and cached.key.ref == ref:
            return cached.key
        key = SigningKey(ref, load_private_key(ref.path, ref.algorithm))
        self._cache[(ref.path, ref.algorithm)] = _Cached(stamp, key)
        return key
