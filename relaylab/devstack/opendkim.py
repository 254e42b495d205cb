"""Throwaway OpenDKIM milter, plus offline signing/verification with OpenDKIM itself.

* :class:`OpenDKIM` runs ``opendkim -f -x DIR/opendkim.conf`` as a child process on
  ``inet:PORT@127.0.0.1``.  Default mode "s": signs mail whose From: domain is `domain`, but
  only for SMTP-AUTH senders (see the InternalHosts note in `write_config`).
* :func:`opendkim_verify` checks a message with OpenDKIM's own verifier (libopendkim), with
  no DNS: ``opendkim -t MSGFILE`` (test mode) + ``TestPublicKeys FILE`` in a temporary config.
  The verdict is read from the Authentication-Results header that test mode prints with -vv.
* :func:`opendkim_sign` signs a message the same way (test mode, Mode s).

OpenDKIM 2.11 (Debian 12) supports rsa-sha256 and ed25519-sha256 keys for both.
"""

from __future__ import annotations

import base64
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

from .ports import LOCALHOST, free_port, wait_listening
from .workdir import check_traversable

__all__ = [
    "OpenDKIM",
    "SyslogCatcher",
    "generate_ed25519_key",
    "generate_rsa_key",
    "opendkim_sign",
    "opendkim_verify",
    "parse_txt_record",
]

KeyType = Literal["rsa", "ed25519"]

_INSHEADER = re.compile(r"^### INSHEADER: idx=\d+ hname='([^']*)' hvalue='([^']*)'$", re.M)
_SETREPLY = re.compile(r"^### SETREPLY: .*$", re.M)
_DKIM_RESULT = re.compile(r"\bdkim=([a-z]+)")


# ---------------------------------------------------------------------- keys
def parse_txt_record(text: str) -> bytes:
    """TXT rdata from an opendkim-genkey ``.txt`` zone snippet (all quoted strings joined)."""
    return "".join(re.findall(r'"([^"]*)"', text)).encode("ascii")


def _zone_snippet(selector: str, domain: str, rdata: str) -> str:
    chunks = [rdata[i : i + 250] for i in range(0, len(rdata), 250)]
    quoted = "\n\t  ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey\tIN\tTXT\t( {quoted} )  ; ----- DKIM key {selector} for {domain}\n"


def generate_rsa_key(keydir: Path, domain: str, selector: str, bits: int = 2048) -> Path:
    """opendkim-genkey: KEYDIR/SELECTOR.private (PEM) + SELECTOR.txt; returns the .private.

    No "-h rsa-sha256": that writes the invalid key tag h=rsa-sha256 (must be h=sha256),
    which lenient verifiers such as dkimpy ignore; the default already writes h=sha256.
    """
    keydir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["opendkim-genkey", "-b", str(bits), "-r", "-d", domain, "-s", selector, "-D", str(keydir)],
        check=True,
        capture_output=True,
    )
    return keydir / f"{selector}.private"


def generate_ed25519_key(keydir: Path, domain: str, selector: str) -> Path:
    """ed25519 key (opendkim-genkey cannot make one): PKCS#8 PEM SELECTOR.private, which
    OpenDKIM loads (a bare base64 seed is rejected: "d2i_PrivateKey_bio() failed"), and
    SELECTOR.txt with ``k=ed25519; p=<base64 of the raw 32-byte public key>`` (RFC 8463)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keydir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    private = keydir / f"{selector}.private"
    private.touch(mode=0o600)
    private.write_bytes(pem)
    rdata = f"v=DKIM1; k=ed25519; s=email; p={base64.b64encode(raw).decode()}"
    (keydir / f"{selector}.txt").write_text(_zone_snippet(selector, domain, rdata))
    return private


def _write_test_keys(path: Path, records: Mapping[str, bytes]) -> None:
    # TestPublicKeys format: "<dns name> <TXT rdata>" per line (the rdata may contain spaces).
    lines = []
    for name, rdata in records.items():
        value = rdata.decode("ascii")
        if "\n" in value or "\r" in value:
            raise ValueError(f"TXT record for {name} must be one line")
        lines.append(f"{name.strip().rstrip('.').lower()} {value}\n")
    path.write_text("".join(lines))


# ---------------------------------------------------------------------- offline test mode
def _test_mode(conf_lines: list[str], message: bytes, workdir: Path) -> str:
    """Run ``opendkim -x CONF -t MSG -vv``; return stdout (INSHEADER lines + verdicts)."""
    conf = workdir / "opendkim.conf"
    conf.write_text("\n".join([*conf_lines, "Syslog no", "AuthservID devstack"]) + "\n")
    msg = workdir / "message.eml"
    msg.write_bytes(message)
    res = subprocess.run(
        ["opendkim", "-x", str(conf), "-t", str(msg), "-vv"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    out = res.stdout.decode(errors="replace")
    if res.returncode != 0:
        raise RuntimeError(
            f"opendkim test mode failed (exit {res.returncode}):\n{out}{res.stderr.decode(errors='replace')}"
        )
    return out


def opendkim_verify(message: bytes, records: Mapping[str, bytes]) -> tuple[bool, str]:
    """Verify every DKIM-Signature of `message` with OpenDKIM's verifier, offline.

    `records` maps DNS names (``s1._domainkey.example.com``) to TXT rdata.  Keys come only
    from that table (TestPublicKeys): no DNS query is made.  Returns (ok, detail): ok is
    True iff the message has at least one signature and OpenDKIM's Authentication-Results
    says dkim=pass for all of them; detail is that A-R value plus OpenDKIM's verdict lines
    (e.g. "verification (s=s1, d=example.com, 2048-bit key) succeeded" or "... failed:
    signature verification failed" / "key not found in DNS" / "message not signed").
    Messages should use CRLF line ends (as delivered by SMTP).
    """
    with tempfile.TemporaryDirectory(prefix="relaylab-dkimverify-") as tmp:
        keys = Path(tmp) / "keys.txt"
        _write_test_keys(keys, records)
        out = _test_mode(["Mode v", f"TestPublicKeys {keys}"], message, Path(tmp))
    results: list[str] = []
    details: list[str] = []
    for hname, hvalue in _INSHEADER.findall(out):
        if hname.lower() == "authentication-results":
            unfolded = re.sub(r"\s*\n\s*", " ", hvalue)
            details.append(f"Authentication-Results: {unfolded}")
            results += _DKIM_RESULT.findall(unfolded)
    details += [line.split(": ", 2)[-1] for line in out.splitlines() if line.startswith("opendkim: ")]
    ok = bool(results) and all(r == "pass" for r in results)
    return ok, "\n".join(details)


def opendkim_sign(
    message: bytes,
    key_file: Path,
    domain: str = "example.com",
    selector: str = "s1",
    algorithm: str | None = None,
    canonicalization: str = "relaxed/simple",
) -> bytes:
    """Sign `message` with OpenDKIM (test mode); return it with the DKIM-Signature on top.

    `algorithm` defaults to rsa-sha256, or ed25519-sha256 for an ed25519 PEM key.
    """
    key_file = Path(key_file).resolve()
    if algorithm is None:
        pem = key_file.read_bytes()
        is_ed = b"BEGIN PRIVATE KEY" in pem and _is_ed25519_pem(pem)
        algorithm = "ed25519-sha256" if is_ed else "rsa-sha256"
    with tempfile.TemporaryDirectory(prefix="relaylab-dkimsign-") as tmp:
        out = _test_mode(
            [
                "Mode s",
                f"Domain {domain}",
                f"Selector {selector}",
                f"KeyFile {key_file}",
                f"SignatureAlgorithm {algorithm}",
                f"Canonicalization {canonicalization}",
                "RequireSafeKeys false",
            ],
            message,
            Path(tmp),
        )
    for hname, hvalue in _INSHEADER.findall(out):
        if hname.lower() == "dkim-signature":
            folded = hvalue.replace("\r\n", "\n").replace("\n", "\r\n")
            return f"DKIM-Signature: {folded}\r\n".encode() + message
    errors = "\n".join(_SETREPLY.findall(out) + out.splitlines()[-3:])
    raise RuntimeError(f"opendkim did not sign the message:\n{errors}")


def _is_ed25519_pem(pem: bytes) -> bool:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return isinstance(load_pem_private_key(pem, password=None), Ed25519PrivateKey)


# ---------------------------------------------------------------------- syslog catcher
class SyslogCatcher:
    """Receives syslog(3) datagrams on `path` (default /dev/log) in a thread -> `out` file.

    OpenDKIM logs only via syslog(3) and this host has no syslog daemon, so without this its
    errors (e.g. "key data is not secure") are invisible.  /dev/log is machine-wide:
    start() returns False and does nothing if the path already exists.
    """

    def __init__(self, out: Path, path: Path = Path("/dev/log")) -> None:
        self.out = Path(out)
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> bool:
        if self.path.exists() or self.path.is_symlink():
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.path))
        self.path.chmod(0o666)
        sock.settimeout(0.2)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="syslog-catcher", daemon=True)
        self._thread.start()
        return True

    def _loop(self) -> None:
        assert self._sock is not None
        with self.out.open("a", buffering=1) as f:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                f.write(data.decode("utf-8", "replace").rstrip("\n") + "\n")

    def stop(self) -> None:
        if self._sock is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self._sock.close()
        self._sock = None
        self.path.unlink(missing_ok=True)

    def text(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# ---------------------------------------------------------------------- the milter
class OpenDKIM:
    """OpenDKIM milter on inet:PORT@127.0.0.1 with its own config and keys under `dir`.

    Files: DIR/keys/SELECTOR.{private,txt}, DIR/{KeyTable,SigningTable,InternalHosts,
    TestPublicKeys,opendkim.conf}, DIR/opendkim.out (stdout/stderr: config errors only).
    `mode` is OpenDKIM's Mode ("s", "v" or "sv"); verification never uses DNS: public keys
    come from TestPublicKeys (this instance's own record plus `test_public_keys`).
    `sign_internal=True` also signs unauthenticated mail from 127.0.0.1.
    `syslog=True` runs a :class:`SyslogCatcher` on /dev/log (if free) into DIR/syslog.log.
    """

    def __init__(
        self,
        dir: Path,
        port: int | None = None,
        domain: str = "example.com",
        selector: str = "s1",
        *,
        key_type: KeyType = "rsa",
        key_bits: int = 2048,
        mode: str = "s",
        sign_internal: bool = False,
        test_public_keys: Mapping[str, bytes] | None = None,
        extra_conf: Mapping[str, str] | None = None,
        syslog: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        self.dir = Path(dir).resolve()
        self.port: int = free_port() if port is None else port
        self.domain = domain
        self.selector = selector
        self.key_type: KeyType = key_type
        self.key_bits = key_bits
        self.mode = mode
        self.sign_internal = sign_internal
        self.test_public_keys: dict[str, bytes] = dict(test_public_keys or {})
        self.extra_conf: dict[str, str] = dict(extra_conf or {})
        self.start_timeout = start_timeout
        self.syslog = SyslogCatcher(self.dir / "syslog.log") if syslog else None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"OpenDKIM(dir={str(self.dir)!r}, port={self.port}, {self.selector}@{self.domain})"

    # -------------------------------------------------------------- keys
    @property
    def key_path(self) -> Path:
        return self.dir / "keys" / f"{self.selector}.private"

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt_record(self) -> bytes:
        """The public key TXT rdata ("v=DKIM1; ... p=..."), quoted strings joined."""
        return parse_txt_record((self.dir / "keys" / f"{self.selector}.txt").read_text())

    @property
    def records(self) -> dict[str, bytes]:
        """{dns_name: txt_record}: ready for :func:`opendkim_verify`."""
        return {self.dns_name: self.txt_record}

    @property
    def algorithm(self) -> str:
        return "ed25519-sha256" if self.key_type == "ed25519" else "rsa-sha256"

    def ensure_key(self) -> Path:
        if not self.key_path.exists():
            if self.key_type == "ed25519":
                generate_ed25519_key(self.key_path.parent, self.domain, self.selector)
            else:
                generate_rsa_key(self.key_path.parent, self.domain, self.selector, self.key_bits)
        return self.key_path

    # -------------------------------------------------------------- config
    def conf(self) -> dict[str, str]:
        d = self.dir
        cf = {
            "Syslog": "yes",
            "SyslogSuccess": "yes",
            "LogWhy": "yes",
            "UMask": "007",
            "UserID": "opendkim:opendkim",
            "Mode": self.mode,
            "Socket": f"inet:{self.port}@{LOCALHOST}",
            "Canonicalization": "relaxed/simple",
            "SignatureAlgorithm": self.algorithm,
            "OversignHeaders": "From",
            # Keys under /tmp (a world-writable ancestor) are "not secure": every signing
            # attempt fails and the milter answers 451 4.7.1 at end of DATA.
            "RequireSafeKeys": "false",
            "KeyTable": f"file:{d / 'KeyTable'}",
            "SigningTable": f"refile:{d / 'SigningTable'}",
            "InternalHosts": f"file:{d / 'InternalHosts'}",
            # Public keys only from this file (verify mode), never from DNS; and any other
            # lookup goes to 127.0.0.1 only.
            "TestPublicKeys": str(d / "TestPublicKeys"),
            "Nameservers": LOCALHOST,
            "DNSTimeout": "1",
            "AuthservID": "devstack",
        }
        cf.update(self.extra_conf)
        return cf

    def write_config(self) -> None:
        d = self.dir
        (d / "KeyTable").write_text(f"{self.dns_name} {self.domain}:{self.selector}:{self.key_path}\n")
        (d / "SigningTable").write_text(f"*@{self.domain} {self.dns_name}\n")
        # The default InternalHosts is 127.0.0.1, i.e. everything Postfix relays from
        # localhost would be signed.  A TEST-NET address matches nothing, so signing is
        # decided by the {auth_type}/{auth_authen} macros (milter_mail_macros): AUTH only.
        (d / "InternalHosts").write_text("127.0.0.1\n" if self.sign_internal else "192.0.2.1\n")
        _write_test_keys(d / "TestPublicKeys", {**self.records, **self.test_public_keys})
        (d / "opendkim.conf").write_text(
            "# Generated by relaylab.devstack\n" + "".join(f"{k} {v}\n" for k, v in self.conf().items())
        )
        for name in ("KeyTable", "SigningTable", "InternalHosts", "TestPublicKeys", "opendkim.conf"):
            shutil.chown(d / name, "root", "opendkim")
            (d / name).chmod(0o640)

    # -------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def out_path(self) -> Path:
        return self.dir / "opendkim.out"

    def start(self) -> OpenDKIM:
        if self.running:
            raise RuntimeError(f"opendkim on port {self.port} already started")
        self.dir.mkdir(parents=True, exist_ok=True)
        # opendkim (after setuid) opens the key file by absolute path.
        check_traversable(self.dir, "opendkim")
        shutil.chown(self.dir, "root", "opendkim")
        self.dir.chmod(0o750)
        self.ensure_key()
        keys = self.key_path.parent
        for p in (keys, *keys.iterdir()):
            shutil.chown(p, "opendkim", "opendkim")
        keys.chmod(0o700)
        self.key_path.chmod(0o600)
        self.write_config()
        if self.syslog is not None:
            self.syslog.start()
        # -f: stay in the foreground as our child, so stop() signals exactly this pid.
        with self.out_path.open("ab") as out:
            self._proc = subprocess.Popen(
                ["opendkim", "-f", "-x", str(self.dir / "opendkim.conf")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self.stop()
                raise RuntimeError(f"opendkim exited with {rc}:\n{self.log_text()}")
            try:
                wait_listening(self.port, timeout=0.2)
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop(grace=0)
                    raise TimeoutError(
                        f"opendkim did not listen on {self.port}:\n{self.log_text()}"
                    ) from None

    def stop(self, grace: float = 6.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (libmilter takes ~4.5 s to exit)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.syslog is not None:
            self.syslog.stop()

    def log_text(self) -> str:
        """opendkim's stdout/stderr, plus its syslog lines if the catcher is on."""
        parts = []
        try:
            parts.append(self.out_path.read_text(errors="replace"))
        except FileNotFoundError:
            pass
        if self.syslog is not None:
            parts.append(self.syslog.text())
        return "".join(parts)

    def __enter__(self) -> OpenDKIM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
