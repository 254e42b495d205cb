"""`relaylab check`: what would make a service fail at start, found before starting it.

Beyond loading the policy (file:line:key errors, keys parsed): the files the services
read must be readable by the user they run as (`User=` of the installed unit), their
listen ports must be free, and Redis should answer (a warning: the services start
without it and tempfail until it is back).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from relaylab.policy.model import Policy

__all__ = [
    "DEFAULT_UNIT",
    "Finding",
    "files_to_read",
    "listen_ports",
    "port_findings",
    "read_findings",
    "readable_as",
    "redis_finding",
    "sending_ip_findings",
    "tracker_finding",
    "transport_findings",
    "unit_user",
]

DEFAULT_UNIT = Path("/etc/systemd/system/relaylab-milter.service")


@attrs.frozen
class Finding:
    level: str  # "error" (the service would fail) or "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def unit_user(unit: Path) -> str | None:
    """The `User=` of a systemd unit file, None if the file or the setting is absent."""
    try:
        text = unit.read_text()
    except OSError:
        return None
    user = None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "User":
            user = value.strip() or None  # the last assignment wins, as in systemd
    return user


def files_to_read(policy: Policy) -> list[tuple[Path, str]]:
    """(path, what it is) for every file a service opens: the policy, DKIM keys, tracker
    secrets, webhook secrets and passwords, the send API's SASL passwords."""
    out: list[tuple[Path, str]] = [(policy.source, "the policy file")]
    out += [(k.path, f"DKIM key {k.selector}._domainkey.{k.domain}") for k in policy.all_keys()]
    out += [(k.secret_file, f"tracker key {k.id}") for k in policy.tracker.keys
            if k.secret_file is not None]
    for sub in policy.subaccounts:
        hook = sub.webhook
        if hook is not None and hook.secret_file is not None:
            out.append((hook.secret_file, f"webhook secret of {sub.name}"))
        if hook is not None and hook.auth is not None and hook.auth.password_file is not None:
            out.append((hook.auth.password_file, f"webhook password of {sub.name}"))
        api = sub.api_login
        if api is not None and api.password_file is not None:
            out.append((api.password_file, f"send API password of {sub.name}"))
    if policy.bounces.secret_file is not None:
        out.append((policy.bounces.secret_file, "bounces secret"))
    return out


def readable_as(user: str, paths: Sequence[Path]) -> dict[Path, str | None]:
    """For each path: None if `user` can open it for reading, else the error text.

    A child process takes the user's uid, gid and groups and tries to open each file:
    os.access() as root would say yes to everything."""
    pw = pwd.getpwnam(user)  # KeyError: no such user
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            os.close(rfd)
            os.initgroups(user, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            result: dict[str, str | None] = {}
            for p in paths:
                try:
                    with open(p, "rb"):
                        result[str(p)] = None
                except OSError as e:
                    result[str(p)] = e.strerror or str(e)
            os.write(wfd, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise PermissionError(f"cannot switch to user {user!r} (run as root)")
    raw: dict[str, str | None] = json.loads(data)
    return {Path(k): v for k, v in raw.items()}


def read_findings(policy: Policy, user: str | None) -> list[Finding]:
    """Every file of the policy that `user` (None: the current user) cannot read."""
    files = files_to_read(policy)
    if user is None:
        results: dict[Path, str | None] = {}
        for p, _ in files:
            try:
                with open(p, "rb"):
                    results[p] = None
            except OSError as e:
                results[p] = e.strerror or str(e)
        who = "this user"
    else:
        results = readable_as(user, [p for p, _ in files])
        who = f"user {user}"
    return [Finding("error", f"{what} {p} is not readable by {who}: {results[p]}")
            for p, what in files if results.get(p) is not None]


def listen_ports(policy: Policy) -> list[tuple[str, str, int]]:
    """(service, host, port) of every service the policy configures."""
    out = [("milter", policy.milter.listen_host, policy.milter.listen_port),
           ("policyd", policy.policyd.listen_host, policy.policyd.listen_port)]
    if policy.tracker.enabled:
        out.append(("tracker", policy.tracker.listen_host, policy.tracker.listen_port))
    if policy.bounces.enabled:
        out.append(("bounces", policy.bounces.listen_host, policy.bounces.listen_port))
    if policy.api.clients:  # without clients the API answers nobody: not deployed
        out.append(("api", policy.api.listen_host, policy.api.listen_port))
    return out


def port_findings(ports: Iterable[tuple[str, str, int]]) -> list[Finding]:
    """A port another program holds is an error (the service could not bind it); one held
    by the running Relaylab service of that name is fine (a check before a reload)."""
    out = []
    for service, host, port in ports:
        err = _bind_error(host, port)
        if err is None:
            continue
        holder = _listener(port)
        if holder is not None and _is_service(holder[1], service):
            continue
        who = f" by pid {holder[0]} ({holder[1]})" if holder else ""
        out.append(Finding("error", f"{service}.listen {host}:{port} cannot be used{who}: {err}"))
    return out


def tracker_finding(policy: Policy) -> Finding | None:
    if policy.tracker.enabled:
        return None
    return Finding("warning", "tracker: no base_url or no keys: `relaylab tracker` (the "
                              "relaylab-tracker unit) exits at start; leave it disabled or "
                              "configure tracker:")


def redis_finding(url: str, timeout: float = 3.0) -> Finding | None:
    import redis

    from relaylab.redisclient import sync_client

    client = sync_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as e:
        return Finding("warning", f"Redis at {url} does not answer ({e}): the services start, "
                                  "but tempfail mail until it does")
    finally:
        client.close()
    return None


def sending_ip_findings(policy: Policy) -> list[Finding]:
    """Each sending address must be one of this host's: Postfix's transport bound to it
    could not connect from it otherwise (the mail would wait in the queue)."""
    out = []
    for ip in policy.sending_ips:
        err = _bind_error(ip.address, 0)
        if err is not None:
            out.append(Finding("error", f"sending_ips.{ip.address}: not usable on this host "
                                        f"({err}); configure the address, or remove it"))
    return out


def transport_findings(policy: Policy, postconf: str = "postconf") -> list[Finding]:
    """Each sending address's transport must be in Postfix's master.cf (`postconf -M`,
    which honours MAIL_CONFIG), bound to it: policyd's FILTER to a missing one leaves the
    mail in the queue. No postconf on this host: nothing to check."""
    if not policy.sending_ips or shutil.which(postconf) is None:
        return []
    try:
        done = subprocess.run([postconf, "-M", *(f"{ip.transport}/unix" for ip in policy.sending_ips)],
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return [Finding("warning", f"sending_ips: cannot read Postfix's master.cf ({e})")]
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        return [Finding("warning", "sending_ips: cannot read Postfix's master.cf (postconf -M: "
                                   f"{detail[-1] if detail else done.returncode})")]
    services: dict[str, str] = {}  # name: its line (postconf -M prints one per service)
    for line in done.stdout.decode(errors="replace").splitlines():
        if line.strip():
            services[line.split()[0]] = line
    out = []
    for ip in policy.sending_ips:
        service = services.get(ip.transport)
        bind = f"smtp_bind_address{'6' if ip.ipv6 else ''}={ip.address}"
        if service is None:
            out.append(Finding("error", f"sending_ips.{ip.address}: Postfix's master.cf has no "
                                        f"{ip.transport} service (relaylab postfix transports "
                                        "prints it; add it, then postfix reload)"))
        elif not re.search(r"[\s{]" + re.escape(bind).replace("=", r"\s*=\s*") + r"(?=[\s}]|$)",
                           service):
            out.append(Finding("error", f"sending_ips.{ip.address}: the {ip.transport} service in "
                                        f"Postfix's master.cf lacks -o {bind} (relaylab postfix "
                                        "transports prints it)"))
    return out


def _bind_error(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the services bind
        try:
            s.bind((host, port))
        except OSError as e:
            return "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
    return None


def _listener(port: int) -> tuple[int, str] | None:
    """(pid, command line) of the process listening on TCP `port`, if /proc tells."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                        errors="replace").strip()
                    return int(proc.name), cmd
        except OSError:
            continue
    return None


def _is_service(cmdline: str, service: str) -> bool:
    argv = cmdline.split()
    return any(Path(a).name == "relaylab" or a == "relaylab" for a in argv) and service in argv
