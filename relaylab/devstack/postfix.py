"""Throwaway, self-contained Postfix instances (``postfix -c DIR/etc``), root only.

Layout of one instance::

    DIR/etc/{main.cf,master.cf,sasl/{smtpd.conf,sasldb2}}   config
    DIR/queue                                              queue_directory
    DIR/data                                               data_directory (master.lock)
    DIR/postfix.log                                        maillog_file (postlogd)

Nothing under /etc/postfix is written and the default instance is never touched; several
instances (distinct DIRs and ports) run side by side.  Every message is relayed to
``[127.0.0.1]:sink_port``.  The submission port wants SASL AUTH (PLAIN/LOGIN over plain
text, Cyrus sasldb); the optional `noauth_port` relays for 127.0.0.0/8 without AUTH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from .ports import LOCALHOST, free_port, wait_listening
from .workdir import check_traversable, is_process_alive

__all__ = ["DEFAULT_MILTER_MAIL_MACROS", "DEFAULT_SASL_USERS", "PostfixInstance"]

DEFAULT_SASL_USERS: Mapping[str, str] = {"alice@example.com": "secret"}
DEFAULT_MILTER_MAIL_MACROS = "i {auth_type} {auth_authen} {auth_author} {mail_addr}"

# master.cf service lines after the listeners.  chroot (column 5) is "n" everywhere: the
# Debian default chroots into the queue dir, where the sasldb, /etc/services etc. are missing.
# postlog/postlogd is what writes maillog_file.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A Postfix instance under `dir` with its own config, queue, data dir, log and ports.

    `milter_port` may be a single port or a sequence (milters are applied in that order).
    `milter_macros` overrides ``milter_<stage>_macros`` per stage, e.g.
    ``{"mail": "i {auth_authen}", "rcpt": "..."}`` ("mail" defaults to
    DEFAULT_MILTER_MAIL_MACROS).  `extra_main` entries override/extend main.cf.
    """

    def __init__(
        self,
        dir: Path,
        submit_port: int,
        sink_port: int,
        milter_port: int | Sequence[int] | None = None,
        policy_port: int | None = None,
        sasl_users: Mapping[str, str] | None = None,
        noauth_port: int | None = None,
        milter_default_action: str = "tempfail",
        extra_main: Mapping[str, str] | None = None,
        milter_macros: Mapping[str, str] | None = None,
        *,
        sasl_local_domain: str = "example.com",
        keep_queue: bool = False,
        start_timeout: float = 15.0,
    ) -> None:
        self.dir = Path(dir).resolve()
        if (
            self.dir == Path("/")
            or self.dir == Path("/etc/postfix")
            or (Path("/etc/postfix") in self.dir.parents)
        ):
            raise ValueError(f"refusing to use {self.dir} as an instance directory")
        self.submit_port = submit_port
        self.sink_port = sink_port
        if milter_port is None:
            self.milter_ports: tuple[int, ...] = ()
        elif isinstance(milter_port, int):
            self.milter_ports = (milter_port,)
        else:
            self.milter_ports = tuple(milter_port)
        self.policy_port = policy_port
        self.sasl_users: dict[str, str] = dict(DEFAULT_SASL_USERS if sasl_users is None else sasl_users)
        self.noauth_port = noauth_port
        self.milter_default_action = milter_default_action
        self.extra_main: dict[str, str] = dict(extra_main or {})
        # master.cf services appended as they are (`relaylab postfix transports` output).
        self.extra_master = ""
        self.milter_macros: dict[str, str] = {"mail": DEFAULT_MILTER_MAIL_MACROS}
        self.milter_macros.update(milter_macros or {})
        self.sasl_local_domain = sasl_local_domain
        self.keep_queue = keep_queue
        self.start_timeout = start_timeout
        self.name = re.sub(r"[^A-Za-z0-9_-]", "_", self.dir.name) or "instance"

    def __repr__(self) -> str:
        return (
            f"PostfixInstance(dir={str(self.dir)!r}, submit_port={self.submit_port}, "
            f"sink_port={self.sink_port}, milter_ports={self.milter_ports}, "
            f"policy_port={self.policy_port}, noauth_port={self.noauth_port})"
        )

    # ------------------------------------------------------------------ paths
    @property
    def conf_dir(self) -> Path:
        # Config apart from the queue: `postfix check` walks the config dir and would warn
        # "not owned by root" for every postfix-owned queue subdirectory.
        return self.dir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.dir / "queue"

    @property
    def data_dir(self) -> Path:
        # Own data_directory per instance: master.lock lives there.
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postfix.log"

    @property
    def sasl_dir(self) -> Path:
        return self.conf_dir / "sasl"

    @property
    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.master_pid
        return pid is not None and is_process_alive(pid)

    # ------------------------------------------------------------------ config
    def restrictions(self, permit: str = "permit_sasl_authenticated") -> tuple[str, str]:
        """(smtpd_recipient_restrictions, smtpd_end_of_data_restrictions)."""
        rcpt = f"{permit}, reject"
        eod = ""
        if self.policy_port is not None:
            # Policy BEFORE permit_*: a permit ends the evaluation, so the policy server
            # would never hear about authenticated senders.
            policy = f"check_policy_service inet:{LOCALHOST}:{self.policy_port}"
            rcpt = f"{policy}, {rcpt}"
            eod = policy
        return rcpt, eod

    def main_cf(self) -> dict[str, str]:
        """main.cf as an ordered mapping (extra_main applied last)."""
        rcpt, eod = self.restrictions()
        milters = ", ".join(f"inet:{LOCALHOST}:{p}" for p in self.milter_ports)
        cf: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # meta_directory/shlib_directory stay at the Debian defaults: dynamicmaps.cf
            # (pcre: etc.) and postfix-files are read from /etc/postfix and /usr/lib/postfix.
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": f"postfix-{self.name}",
            "maillog_file": str(self.log_path),
            # maillog_file must start with one of these, else `postfix` exits 1 silently.
            "maillog_file_prefixes": str(self.dir),
            # The host name has no dot (default would be "<host>.localdomain").
            "myhostname": f"devstack-{self.name}.example.com",
            "mydomain": "example.com",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "no",
            # Everything goes to the sink.
            "relayhost": f"[{LOCALHOST}]:{self.sink_port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            # Test-friendly retry timers (defaults 300s/300s/4000s).
            "queue_run_delay": "10s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "60s",
            "bounce_queue_lifetime": "1h",
            "maximal_queue_lifetime": "1h",
            # SASL: smtpd_sasl_path is the Cyrus application name -> Cyrus reads
            # $cyrus_sasl_config_path/smtpd.conf (Debian default path is /etc/postfix/sasl).
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(self.sasl_dir),
            # A login without "@" gets this realm.
            "smtpd_sasl_local_domain": self.sasl_local_domain,
            # AUTH without TLS: no "noplaintext", no tls_auth_only.
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_tls_auth_only": "no",
            "smtpd_sasl_authenticated_header": "yes",
            # No permit_mynetworks here: even 127.0.0.1 must AUTH on the submission port.
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_recipient_restrictions": rcpt,
            "smtpd_end_of_data_restrictions": eod,
            "smtpd_milters": milters,
            "non_smtpd_milters": "",
            "milter_protocol": "6",
            "milter_default_action": self.milter_default_action,
            "milter_connect_timeout": "10s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "30s",
            # As `relaylab postfix config` sets it: ids never reused, for logd's correlation.
            "enable_long_queue_ids": "yes",
        }
        for stage, macros in self.milter_macros.items():
            cf[f"milter_{stage}_macros"] = macros
        cf.update(self.extra_main)
        return cf

    def master_cf(self) -> str:
        lines = [
            "# Generated by relaylab.devstack.  chroot (column 5) is n everywhere.",
            f"{LOCALHOST}:{self.submit_port} inet n - n - - smtpd",
            f"  -o syslog_name=postfix-{self.name}/submission",
        ]
        if self.noauth_port is not None:
            rcpt, _ = self.restrictions(permit="permit_mynetworks")
            # "-o name=value" must not contain spaces (smtpd dies with "unexpected
            # command-line argument", and `postfix check` does not notice): use -o { ... }.
            lines += [
                f"{LOCALHOST}:{self.noauth_port} inet n - n - - smtpd",
                f"  -o syslog_name=postfix-{self.name}/noauth",
                "  -o smtpd_sasl_auth_enable=no",
                "  -o smtpd_relay_restrictions=permit_mynetworks,reject",
                f"  -o {{ smtpd_recipient_restrictions = {rcpt} }}",
            ]
        return "\n".join(lines) + "\n" + _MASTER_SERVICES + self.extra_master

    def write_config(self) -> None:
        """(Re)write main.cf and master.cf from the current attributes."""
        body = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        main = self.conf_dir / "main.cf"
        main.write_text(f"# Generated by relaylab.devstack - throwaway instance {self.name}\n{body}")
        master = self.conf_dir / "master.cf"
        master.write_text(self.master_cf())
        main.chmod(0o644)
        master.chmod(0o644)

    def write_sasl(self) -> None:
        """smtpd.conf + a fresh sasldb2 holding every entry of `sasl_users`."""
        d = self.sasl_dir
        d.mkdir(parents=True, exist_ok=True)
        db = d / "sasldb2"
        conf = d / "smtpd.conf"
        conf.write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {db}\nmech_list: PLAIN LOGIN\n"
        )
        db.unlink(missing_ok=True)
        for login, password in self.sasl_users.items():
            # Cyrus splits the login "alice@example.com" into user "alice" and realm
            # "example.com", so store it with -u <realm>.
            user, sep, realm = login.rpartition("@")
            if not sep:
                user, realm = login, self.sasl_local_domain
            _run(
                ["saslpasswd2", "-p", "-c", "-f", str(db), "-u", realm, user],
                input=password.encode(),
            )
        # smtpd runs as "postfix"; saslpasswd2 makes the db 0640 root:root, and then AUTH
        # answers "454 4.7.0 Temporary authentication failure".
        shutil.chown(db, "root", "postfix")
        shutil.chown(conf, "root", "postfix")
        db.chmod(0o640)
        conf.chmod(0o644)
        d.chmod(0o755)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PostfixInstance:
        if os.geteuid() != 0:
            raise PermissionError("a Postfix instance needs root (the master runs as root)")
        if self.running:
            raise RuntimeError(f"instance in {self.dir} is already running (pid {self.master_pid})")
        self.dir.mkdir(parents=True, exist_ok=True)
        # Everything postfix reads must be root-owned, not group/world-writable, and every
        # parent directory searchable by "postfix" (daemons open files by absolute path).
        check_traversable(self.dir, "postfix")
        os.chown(self.dir, 0, 0)
        self.dir.chmod(0o755)
        if not self.keep_queue:
            shutil.rmtree(self.queue_dir, ignore_errors=True)
            shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.conf_dir, ignore_errors=True)
        for d in (self.conf_dir, self.queue_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, 0, 0)
            d.chmod(0o755)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        self.data_dir.chmod(0o700)
        self.log_path.touch()
        self.write_sasl()
        self.write_config()
        # `check` also creates the queue subdirectories (post-install create-missing).
        self._postfix("check")
        self._postfix("start")
        deadline = time.monotonic() + self.start_timeout
        for port in (self.submit_port, self.noauth_port):
            if port is None:
                continue
            try:
                wait_listening(port, timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"postfix in {self.dir} is not listening on {port}:\n{tail}") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """`postfix stop`, then wait until the master and all its children are gone."""
        pid = self.master_pid
        if pid is None or not is_process_alive(pid):
            return
        subprocess.run(
            ["postfix", "-c", str(self.conf_dir), "stop"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if not _wait_gone([pid], timeout):
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone([pid], 2.0):
                os.kill(pid, signal.SIGKILL)
        # The master SIGTERMs its children; wait for stragglers (their cwd is the queue dir).
        leftovers = self._queue_processes()
        if not _wait_gone(leftovers, 5.0):
            for p in self._queue_processes():
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reload(self) -> None:
        """Rewrite main.cf/master.cf from the current attributes and `postfix reload`."""
        self.write_config()
        self._postfix("check")
        self._postfix("reload")

    def flush(self) -> None:
        """Attempt delivery of all deferred mail now (`postqueue -f`)."""
        _run(["postqueue", "-c", str(self.conf_dir), "-f"])

    def queue(self) -> list[dict[str, Any]]:
        """The queue as parsed `postqueue -j` JSON objects (queue_name, queue_id, ...)."""
        out = _run(["postqueue", "-c", str(self.conf_dir), "-j"]).stdout
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            q = self.queue()
            if not q:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue of {self.dir} not empty after {timeout:.1f}s: {q}")
            time.sleep(0.1)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches `pattern` (regex); postlogd writes asynchronously."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{pattern!r} not in {self.log_path} after {timeout:.1f}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------ internals
    def _postfix(self, step: str) -> None:
        argv = ["postfix", "-c", str(self.conf_dir), step]
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
        if res.returncode == 0:
            return
        # `postfix` prints its errors only when stderr is a tty (otherwise only to the log,
        # which may not exist yet): re-run under script(1) to get a pty and the real message.
        pty = subprocess.run(
            ["script", "-qec", shlex.join(argv), "/dev/null"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        detail = (res.stdout + res.stderr + pty.stdout + pty.stderr).decode(errors="replace")
        raise RuntimeError(
            f"{shlex.join(argv)} failed (exit {res.returncode}):\n{detail.strip()}\n"
            f"--- {self.log_path} (tail):\n{self.log_tail()}"
        )

    def _queue_processes(self) -> list[int]:
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if os.readlink(p / "cwd") == str(self.queue_dir):
                    pids.append(int(p.name))
            except OSError:
                continue
        return [p for p in pids if is_process_alive(p)]

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def sasl_upstream(directory: Path, relay_port: int, login: str,
                  password: str) -> Iterator[PostfixInstance]:
    """A running customer's Postfix (an app host) that relays every message with SMTP AUTH
    to 127.0.0.1:`relay_port`, so mail the relay tempfails waits in its queue; submit
    unauthenticated on its `noauth_port`. Stopped and removed afterwards."""
    pf = PostfixInstance(
        directory, submit_port=free_port(), sink_port=relay_port, noauth_port=free_port(),
        extra_main={"smtp_sasl_auth_enable": "yes",
                    "smtp_sasl_password_maps": f"static:{login}:{password}",
                    "smtp_sasl_security_options": "noanonymous"})
    pf.start()
    try:
        yield pf
    finally:
        pf.stop()
        shutil.rmtree(pf.dir, ignore_errors=True)


def _run(argv: list[str], input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run(
        argv,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} failed (exit {res.returncode}): "
            f"{(res.stdout + res.stderr).decode(errors='replace').strip()}"
        )
    return res


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(is_process_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
