"""Create DKIM key pairs: the private key file for the milter, the TXT record for DNS.

The private key is written to a temporary name created with O_EXCL and mode 0600,
fsynced, and only then renamed into place, so a crash leaves either no key or a complete
one, never a half-written file. The services do not run as root: the file takes the group
of its directory (scripts/install.sh makes /etc/relaylab/keys root:relaylab) and is made
0640 for it; if that group cannot be set, it stays 0600.
The DNS record goes beside it (record_path), in the zone-file form of opendkim-genkey's
SELECTOR.txt, written the same way with mode 0644 (it is public).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaylab.dkim.keys import MIN_RSA_BITS, PrivateKey, public_key_b64
from relaylab.policy.model import DkimAlgorithm

DEFAULT_RSA_BITS = 2048
MAX_RSA_BITS = 4096  # larger keys do not fit a TXT answer most DNS providers accept
KEY_FILE_MODE = 0o640  # when the file has its directory's group, else PRIVATE_MODE
PRIVATE_MODE = 0o600
RECORD_FILE_MODE = 0o644
KEY_DIR_MODE = 0o750
MAX_CHARACTER_STRING = 255  # RFC 1035 3.3: one <character-string> is at most 255 octets


class KeyWriteError(Exception):
    """The key file could not be written (exists already, permission denied, ...)."""


def generate_key(algorithm: DkimAlgorithm, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    """A fresh private key; ``bits`` only applies to RSA (Ed25519 keys have a fixed size)."""
    if algorithm is DkimAlgorithm.ED25519_SHA256:
        return ed25519.Ed25519PrivateKey.generate()
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"RSA key size must be between {MIN_RSA_BITS} and {MAX_RSA_BITS} "
                         f"bits, got {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM ("BEGIN PRIVATE KEY"), readable by parse_private_key,
    OpenSSL, OpenDKIM and dkimpy alike."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(key: PrivateKey, path: Path, overwrite: bool = False) -> int:
    """Write ``key`` as PEM to ``path`` atomically, group-readable by the directory's
    group (mode 0640) or else 0600; returns the mode.

    Refuses to replace an existing file (or symlink) unless ``overwrite`` is true; a
    missing parent directory is created with mode 0750. Raises KeyWriteError.
    """
    return _write_file(Path(path), private_key_pem(key), _share_with_directory_group, overwrite)


def write_record(domain: str, selector: str, key: PrivateKey, path: Path,
                 overwrite: bool = False) -> None:
    """Write genkey_txt() to `path` (mode 0644), atomically; raises KeyWriteError."""
    _write_file(Path(path), genkey_txt(domain, selector, key).encode("ascii"),
                lambda fd, parent: RECORD_FILE_MODE, overwrite)


def record_path(key_path: Path) -> Path:
    """Where the DNS record of `key_path` goes: beside it, ``.txt`` in place of ``.key``,
    ``.pem`` or ``.private`` (shop.example.com.rl2026r.key -> shop.example.com.rl2026r.txt),
    else appended."""
    key_path = Path(key_path)
    if key_path.suffix in (".key", ".pem", ".private"):
        return key_path.with_suffix(".txt")
    return key_path.with_name(key_path.name + ".txt")


def _write_file(path: Path, data: bytes, choose_mode: Callable[[int, Path], int],
                overwrite: bool) -> int:
    """Write `data` to `path` atomically with the mode `choose_mode(fd, directory)`
    settles on (created 0600 until then); returns that mode."""
    if path.is_dir():
        raise KeyWriteError(f"{path} is a directory")
    if not overwrite and os.path.lexists(path):
        raise KeyWriteError(f"{path} already exists (pass overwrite to replace it)")
    parent = path.parent
    try:
        parent.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
    except OSError as e:
        raise KeyWriteError(f"cannot create directory {parent}: {e.strerror or e}") from None

    tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, PRIVATE_MODE)
    except OSError as e:
        raise KeyWriteError(f"cannot create a file in {parent}: {e.strerror or e}") from None
    try:
        try:
            mode = choose_mode(fd, parent)
            os.fchmod(fd, mode)  # exactly this whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        _install(tmp, path, overwrite)
    except OSError as e:
        _unlink_quietly(tmp)
        if isinstance(e, FileExistsError):
            raise KeyWriteError(f"{path} already exists (pass overwrite to replace it)") from None
        raise KeyWriteError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(parent)
    return mode


def _share_with_directory_group(fd: int, directory: Path) -> int:
    """Give the open file the directory's group; the mode that is then safe."""
    want = os.stat(directory).st_gid
    if os.fstat(fd).st_gid != want:
        try:
            os.fchown(fd, -1, want)
        except PermissionError:
            return PRIVATE_MODE  # a group we are not in: nobody else may read it
    return KEY_FILE_MODE


def _install(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    # link() fails with EEXIST if the name appeared since the check above: no race in
    # which a key file created concurrently could be clobbered.
    try:
        os.link(tmp, path, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                           errno.EMLINK, errno.ENOSYS):
            raise
        # A filesystem without hard links: best effort, check then rename.
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def record_name(domain: str, selector: str) -> str:
    """``SELECTOR._domainkey.DOMAIN`` (no trailing dot), as a DNS provider's UI wants it."""
    return f"{selector}._domainkey.{domain.lower().rstrip('.')}"


def record_value(key: PrivateKey) -> str:
    """The TXT content as one unquoted line, e.g. ``v=DKIM1; k=rsa; p=MIIB...``.

    No h= tag: omitting it allows every hash, and we only ever sign with sha256.
    """
    return f"v=DKIM1; k={_key_type(key)}; p={public_key_b64(key)}"


def record_strings(key: PrivateKey) -> list[str]:
    """record_value split into <character-string>s of at most 255 bytes; verifiers
    concatenate them without separators (RFC 6376 3.6.2.2)."""
    head = f"v=DKIM1; k={_key_type(key)}; "
    p = "p=" + public_key_b64(key)
    return [head] + [p[i:i + MAX_CHARACTER_STRING] for i in range(0, len(p), MAX_CHARACTER_STRING)]


def txt_record(domain: str, selector: str, key: PrivateKey) -> str:
    """A zone-file entry, multi-line::

        rl2026r._domainkey.shop.example.com. IN TXT ( "v=DKIM1; k=rsa; "
                "p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA..."
                "...IDAQAB" )
    """
    strings = [f'"{s}"' for s in record_strings(key)]
    lines = [f"{record_name(domain, selector)}. IN TXT ( {strings[0]}"]
    lines += [f"\t{s}" for s in strings[1:]]
    lines[-1] += " )"
    return "\n".join(lines)


def txt_record_oneline(domain: str, selector: str, key: PrivateKey) -> str:
    """The same entry on one line (zone files, Route 53-style UIs taking quoted strings)::

        rl2026r._domainkey.shop.example.com. IN TXT "v=DKIM1; k=rsa; " "p=MIIB..." "..."
    """
    strings = " ".join(f'"{s}"' for s in record_strings(key))
    return f"{record_name(domain, selector)}. IN TXT {strings}"


def genkey_txt(domain: str, selector: str, key: PrivateKey) -> str:
    """The record in the form of opendkim-genkey's SELECTOR.txt: the owner name relative
    to the domain's zone, each <character-string> at most 255 bytes, and the comment that
    names selector and domain (tools such as the test harness's verifier read it)::

        rl2026r._domainkey\tIN\tTXT\t( "v=DKIM1; k=rsa; "
        \t  "p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA..."
        \t  "...IDAQAB" )  ; ----- DKIM key rl2026r for shop.example.com
    """
    strings = "\n\t  ".join(f'"{s}"' for s in record_strings(key))
    domain = domain.lower().rstrip(".")
    return (f"{selector}._domainkey\tIN\tTXT\t( {strings} )  "
            f"; ----- DKIM key {selector} for {domain}\n")


def _key_type(key: PrivateKey) -> str:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
