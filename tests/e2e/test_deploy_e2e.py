"""The README's "Deploying next to an existing Postfix", done as an operator would.

`scripts/install.sh` into a scratch root (its own service user), DKIM keys made with the
installed `relaylab`, the policy edited, `relaylab check`, the three services started from
their installed units' ExecStart as the unit's User=, and a Postfix built from Debian's
default configuration plus exactly the output of `relaylab postfix config --apply`.
Authenticated mail through it arrives signed (RSA and Ed25519, verified by the installed
venv alone) and counted by policyd; an unauthenticated client cannot relay. A tracked
subaccount's HTML mail arrives signed with its link rewritten to the installed tracker,
which redirects it to the link as written and records the click. The services run on the
venv install.sh built with /usr/bin/python3 (Debian 12: 3.11.2, where the HTML tokenizer
once failed every linked page), not on the tests' Python.

The Postfix instance: main.cf is Debian's /usr/share/postfix/main.cf.debian plus what
Debian's postinst sets on an "Internet Site" install (DEBIAN_POSTINST), master.cf is
/usr/share/postfix/master.cf.dist; then the shipped commands and the README's for a log
file; then ISOLATION (and only that): what a throwaway instance on loopback next to the
host's own Postfix needs. smtpd runs chrooted in the queue directory as on Debian, with
the SASL database where the README's commands put it, inside the chroot.

README shell blocks marked `<!-- NAME: run by tests/e2e/test_deploy_e2e.py -->` are run
from the README itself (readme_block()), the host's paths replaced by the scratch ones.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis
import yaml

from relaylab.devstack.ports import LOCALHOST, free_port, wait_listening
from relaylab.devstack.postfix import PostfixInstance
from relaylab.devstack.process import ChildProcess
from relaylab.devstack.redis import RedisServer
from relaylab.devstack.sink import SinkProcess
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.workdir import make_workdir
from relaylab.suppression.keys import events_key

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install.sh"
# Not "relaylab": never touch a real installation's user; and one per run, so that runs
# from two checkouts at once do not delete each other's.
USER = f"rl-deploy-{os.getpid()}"
OTHER_USER = f"rl-undeploy-{os.getpid()}"
README = REPO / "README.md"
SERVICES = ("milter", "policyd", "tracker")
LOGIN, PASSWORD = "shop@relay.test", "shop-secret"
DOMAIN = "shop.example.com"

# What Debian's postinst (/var/lib/dpkg/info/postfix.postinst, postfix 3.7, "Internet
# Site") adds to main.cf.debian on a fresh install: this is the stock /etc/postfix/main.cf.
DEBIAN_POSTINST = [
    "smtpd_relay_restrictions=permit_mynetworks permit_sasl_authenticated defer_unauth_destination",
    "myhostname=relay.example.net",
    "alias_maps=hash:/etc/aliases",
    "alias_database=hash:/etc/aliases",
    "mydestination=$myhostname, relay.example.net, localhost.localdomain, , localhost",
    "relayhost=",
    "mynetworks=127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128",
    "mailbox_size_limit=0",
    "recipient_delimiter=+",
    "inet_interfaces=all",
    "inet_protocols=all",
]


def _run(argv: list[str], *, check: bool = True, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


class DebianDefaultPostfix(PostfixInstance):
    """A throwaway Postfix whose config is Debian's default plus the shipped commands,
    smtpd chrooted as Debian's master.cf has it, its SASL database and log set up by the
    README's commands. The lifecycle and log helpers are devstack's."""

    def __init__(self, dir: Path, sink_port: int, policy: Path, relaylab: Path) -> None:
        super().__init__(dir, submit_port=free_port(), sink_port=sink_port,
                         sasl_users={LOGIN: PASSWORD})
        self.smtp_port = free_port()  # master.cf "smtp" (25)
        self.policy = policy
        self.relaylab = relaylab
        self.shipped_output = ""

    def postconf(self, *args: str) -> None:
        _run(["postconf", "-c", str(self.conf_dir), *args])

    def write_sasl(self) -> None:
        """README step 4, Cyrus sasldb: /etc/postfix/sasl is this instance's (Debian's
        package ships that directory), /var/spool/postfix its queue directory."""
        self.sasl_dir.mkdir(parents=True, exist_ok=True)
        user, _, realm = LOGIN.partition("@")
        script = readme_block("cyrus-sasldb", {
            "/etc/postfix/sasl": str(self.sasl_dir), "/var/spool/postfix": str(self.queue_dir),
            "saslpasswd2 -c": "saslpasswd2 -p -c",  # the password on stdin
            "-u relay.example.net shop-tx": f"-u {realm} {user}"})
        res = subprocess.run(["bash", "-euc", script], input=PASSWORD, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr

    def write_config(self) -> None:
        shutil.copy("/usr/share/postfix/main.cf.debian", self.conf_dir / "main.cf")
        shutil.copy("/usr/share/postfix/master.cf.dist", self.conf_dir / "master.cf")
        for setting in DEBIAN_POSTINST:
            self.postconf("-e", setting)

        # ---- exactly what the README says to run ------------------------------------
        res = _run([str(self.relaylab), "postfix", "config", "--apply", "--config",
                    str(self.policy)], env={"MAIL_CONFIG": str(self.conf_dir)})
        self.shipped_output = res.stdout

        # There is no syslog here: the README's lines for that (`service postfix start`
        # is the harness's start(), after configure-instance.sh below).
        block = readme_block("postfix-without-syslog", {
            "postconf -e": f"postconf -c {self.conf_dir} -e", "/var/log/postfix.log": str(self.log_path)})
        postconf, start = block.strip().splitlines()
        assert start.startswith("service postfix start"), start
        _run(["bash", "-euc", postconf])

        # ---- ISOLATION: a throwaway instance on loopback, nothing else ---------------
        self.postconf("-e",
                      f"queue_directory={self.queue_dir}",
                      f"data_directory={self.data_dir}",    # master.lock
                      f"maillog_file_prefixes={self.dir}",  # the log is not under /var
                      f"relayhost=[{LOCALHOST}]:{self.sink_port}",
                      f"cyrus_sasl_config_path={self.sasl_dir}",  # /etc/postfix/sasl
                      "inet_protocols=ipv4")                # the box has no IPv6
        master = (self.conf_dir / "master.cf").read_text()
        master = re.sub(r"(?m)^smtp(\s+inet)", rf"{LOCALHOST}:{self.smtp_port}\1", master)
        master = re.sub(r"(?m)^submission(\s+inet)", rf"{LOCALHOST}:{self.submit_port}\1", master)
        (self.conf_dir / "master.cf").write_text(master)
        # What Debian's init script and postfix@.service run before `postfix start`: the
        # files the chrooted daemons need, copied into the queue directory.
        _run(["/usr/lib/postfix/configure-instance.sh", "-"], env={"MAIL_CONFIG": str(self.conf_dir)})


class UnitProcess(ChildProcess):
    """A service started the way its installed unit says: ExecStart, User=, Group=,
    Environment= (there is no systemd here)."""

    def __init__(self, unit: Path, log_path: Path, port: int) -> None:
        self.unit = parse_unit(unit)
        self._log = log_path
        self.port = port

    @property
    def log_path(self) -> Path:
        return self._log

    def start(self) -> UnitProcess:
        u = self.unit
        env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1",
               **{k[4:]: v for k, v in u.items() if k.startswith("env:")}}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                shlex.split(u["ExecStart"]), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, user=u["User"], group=u["Group"],
                extra_groups=[], cwd="/")
        try:
            wait_listening(self.port, 20)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{u['ExecStart']} did not start:\n{self.log_text()}") from None
        return self


class ReadmeServices:
    """The three services started by the README's commands for a host without systemd
    (run as root, as there): the relaylab user and paths replaced by this install's."""

    def __init__(self, d: Deployment, log_dir: Path, ports: dict[str, int]) -> None:
        self.script = readme_block("services-without-systemd", {
            "-u relaylab": f"-u {USER}", "/usr/local/bin/relaylab": str(d.relaylab),
            "/var/log/": f"{log_dir}/"})
        self.log_dir = log_dir
        self.ports = ports
        self._shell: subprocess.Popen[bytes] | None = None

    def log(self, service: str) -> str:
        return (self.log_dir / f"relaylab-{service}.log").read_text(errors="replace")

    def start(self) -> ReadmeServices:
        # Its own process group: the shell exits at once, the services stay in the group.
        self._shell = subprocess.Popen(["bash", "-euc", self.script], stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        assert self._shell.wait(10) == 0
        for service, port in self.ports.items():
            try:
                wait_listening(port, 20)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"{service} did not start:\n{self.log(service)}") from None
        return self

    def stop(self) -> None:
        if self._shell is None:
            return
        group = self._shell.pid
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


def parse_unit(path: Path) -> dict[str, str]:
    """The unit's settings; Environment=K=V lines become "env:K" entries."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key == "Environment":
            k, _, v = value.partition("=")
            out[f"env:{k}"] = v
        else:
            out[key] = value
    return out


@dataclass
class Deployment:
    root: Path
    prefix: Path
    etc: Path
    unit_dir: Path
    relaylab: Path  # the `relaylab` on PATH (bin-dir symlink)
    install_output: str

    @property
    def policy(self) -> Path:
        return self.etc / "relaylab.yaml"

    def unit(self, service: str) -> Path:
        return self.unit_dir / f"relaylab-{service}.service"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([str(self.relaylab), *args], check=check)


def install(root: Path, user: str = USER) -> subprocess.CompletedProcess[str]:
    return _run(["bash", str(INSTALL), "--root", str(root), "--user", user])


def uninstall(root: Path, user: str = USER) -> subprocess.CompletedProcess[str]:
    return _run(["bash", str(INSTALL), "--uninstall", "--root", str(root), "--user", user])


def drop_user(user: str) -> None:
    """A leftover of an interrupted run (the install would not record it as its own)."""
    if subprocess.run(["getent", "passwd", user], capture_output=True).returncode == 0:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)


def drop_stale_users() -> None:
    """The users of earlier runs whose process is gone (interrupted before uninstalling)."""
    for pw in pwd.getpwall():
        m = re.fullmatch(r"rl-(?:un)?deploy-([0-9]+)", pw.pw_name)
        if m and not Path(f"/proc/{m[1]}").exists():
            drop_user(pw.pw_name)


def readme_block(name: str, replace: dict[str, str]) -> str:
    """The README's shell block after the comment `<!-- NAME: ... -->`, with the host's
    paths replaced by this test's (each must occur)."""
    m = re.search(rf"<!-- {name}: [^>]*-->\n\s*```sh\n(.*?)^\s*```", README.read_text(), re.S | re.M)
    assert m is not None, f"no block {name} in README.md"
    block = textwrap.dedent(m[1])
    for old, new in replace.items():
        assert old in block, (old, block)
        block = block.replace(old, new)
    return block


@pytest.fixture(scope="module")
def deployed() -> Iterator[Deployment]:
    drop_stale_users()
    root = make_workdir("relaylab-deploy-")
    res = install(root)
    d = Deployment(root=root, prefix=root / "opt/relaylab", etc=root / "etc/relaylab",
                   unit_dir=root / "etc/systemd/system", relaylab=root / "usr/local/bin/relaylab",
                   install_output=res.stdout)
    try:
        yield d
    finally:
        uninstall(root)
        shutil.rmtree(root, ignore_errors=True)


def test_install_creates_user_config_keys_dir_units_and_command(deployed: Deployment) -> None:
    d = deployed
    pw = pwd.getpwnam(USER)
    assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_uid < 1000  # a system user

    def owner_mode(p: Path) -> tuple[int, int, int]:
        st = p.stat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner_mode(d.etc) == (0, pw.pw_gid, 0o750)
    assert owner_mode(d.etc / "keys") == (0, pw.pw_gid, 0o2750)  # setgid: new keys get the group
    assert owner_mode(d.policy) == (0, pw.pw_gid, 0o640)
    assert owner_mode(d.etc / "keys/tracker.k2026a.secret") == (0, pw.pw_gid, 0o640)
    # The venv is built with the system Python.
    cfg = (d.prefix / "venv/pyvenv.cfg").read_text()
    assert re.search(r"(?m)^home = /usr/bin$", cfg), cfg
    assert d.relaylab.read_text().splitlines()[-1] == f"exec '{d.prefix}/venv/bin/relaylab' \"$@\""
    assert stat.S_IMODE(d.relaylab.stat().st_mode) == 0o755
    assert d.cli("--help").stdout.startswith("usage: relaylab")

    for service in SERVICES:
        unit = parse_unit(d.unit(service))
        assert unit["User"] == USER and unit["Group"] == USER
        assert unit["ExecStart"] == f"{d.prefix}/venv/bin/relaylab {service}"
        assert unit["env:RELAYLAB_CONFIG"] == str(d.policy)
        assert unit["LimitNOFILE"] == "65536"
        doc = unit["Documentation"]
        assert doc.startswith("file://") and Path(doc.removeprefix("file://")).is_file(), doc
    logd = parse_unit(d.unit("logd"))  # installed too; it needs a Postfix log, not a port
    assert (logd["User"], logd["ExecStart"]) == (USER, f"{d.prefix}/venv/bin/relaylab logd")
    assert logd["env:RELAYLAB_CONFIG"] == str(d.policy)
    hooks = parse_unit(d.unit("webhooks"))  # installed too; it listens on no port
    assert (hooks["User"], hooks["ExecStart"]) == (
        USER, f"{d.prefix}/venv/bin/relaylab webhooks serve")
    assert hooks["env:RELAYLAB_CONFIG"] == str(d.policy)
    assert d.cli("webhooks", "secret").stdout.startswith("whsec_")  # the package has it
    bounce = parse_unit(d.unit("bounces"))  # installed too; needs bounces.domain to run
    assert (bounce["User"], bounce["ExecStart"]) == (USER, f"{d.prefix}/venv/bin/relaylab bounces")
    api = parse_unit(d.unit("api"))  # installed too; answers only clients in api.clients
    assert (api["User"], api["ExecStart"]) == (USER, f"{d.prefix}/venv/bin/relaylab api serve")
    assert api["env:RELAYLAB_CONFIG"] == str(d.policy)
    assert d.cli("api", "keygen", "--operator").stdout.startswith("app key: ")  # packaged
    res = _run(["systemd-analyze", "verify",
                *(str(d.unit(s)) for s in (*SERVICES, "logd", "webhooks", "bounces", "api"))],
               check=False)
    assert res.returncode == 0 and "relaylab" not in res.stderr, res.stderr


def test_relaylab_on_path_reads_the_installed_policy_in_any_directory(deployed: Deployment) -> None:
    """Run from a checkout (whose conf/relaylab.yaml the bare venv command would take), the
    `relaylab` on PATH still reads the installed policy; RELAYLAB_CONFIG and --config win."""
    d = deployed
    assert (REPO / "conf/relaylab.yaml").is_file()
    env = {k: v for k, v in os.environ.items() if k != "RELAYLAB_CONFIG"}

    def check(*args: str, **extra: str) -> str:
        res = subprocess.run([str(d.relaylab), "check", "--as-user", "root", *args], cwd=REPO,
                             capture_output=True, text=True, env={**env, **extra})
        return res.stdout + res.stderr

    out = check()
    assert str(d.policy) in out and "conf/relaylab.yaml" not in out, out
    other = d.root / "other.yaml"
    assert f"problem(s) in {other}" in check(RELAYLAB_CONFIG=str(other))
    assert f"problem(s) in {other}" in check("--config", str(other), RELAYLAB_CONFIG=str(d.policy))
    # the venv's own command, without the wrapper, takes the checkout's file: why it exists
    venv = subprocess.run([str(d.prefix / "venv/bin/relaylab"), "check", "--as-user", "root"], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert "conf/relaylab.yaml" in venv.stdout + venv.stderr


@pytest.fixture(scope="module")
def dkim_keys(deployed: Deployment) -> tuple[Path, Path]:
    """The domain's RSA and Ed25519 keys, made by root with the installed `relaylab` as the
    README says."""
    d = deployed
    keys = d.etc / f"keys/{DOMAIN}.s1.key", d.etc / f"keys/{DOMAIN}.s2.key"
    for key, alg in zip(keys, ("rsa", "ed25519"), strict=True):
        key.unlink(missing_ok=True)
        d.cli("dkim", "keygen", "--domain", DOMAIN, "--selector", key.stem.split(".")[-1],
              "--algorithm", alg, "--out", str(key))
    return keys


@dataclass
class Running:
    """The deployed relay, running: the services (from their units, or as the README
    starts them without systemd), the Debian-default Postfix, a sink behind it."""

    sink: SinkProcess
    procs: dict[str, UnitProcess]
    readme: ReadmeServices | None
    postfix: DebianDefaultPostfix
    ports: dict[str, int]

    def log(self, service: str) -> str:
        return self.readme.log(service) if self.readme is not None else self.procs[service].log_text()


def write_policy(d: Deployment, redis_url: str, ports: dict[str, int], subaccount: dict[str, object],
                 keys: tuple[Path, Path]) -> None:
    """The example policy as an operator edits it: this host's Redis and ports, the tracker
    at its listening address, one subaccount signing DOMAIN with both keys."""
    policy = yaml.safe_load((d.prefix / "share/doc/relaylab/relaylab.yaml.example").read_text())
    policy["redis"]["url"] = redis_url
    for s in SERVICES:
        policy[s]["listen"] = f"127.0.0.1:{ports[s]}"
    policy["milter"]["workers"] = 1
    policy["tracker"]["workers"] = 1
    policy["tracker"]["base_url"] = f"http://127.0.0.1:{ports['tracker']}"
    rsa_key, ed_key = keys
    policy["subaccounts"] = {"deploy-shop": {
        "logins": [LOGIN], "plan": "shared",
        "domains": {DOMAIN: {"dkim": [
            {"selector": "s1", "key": f"keys/{rsa_key.name}", "algorithm": "rsa-sha256"},
            {"selector": "s2", "key": f"keys/{ed_key.name}", "algorithm": "ed25519-sha256"}]}},
        **subaccount}}
    d.policy.write_text(yaml.safe_dump(policy, sort_keys=False))


@contextmanager
def running(d: Deployment, ports: dict[str, int], *, systemd: bool = True) -> Iterator[Running]:
    """systemd: the services started as their units say; else by the README's commands."""
    workdir = make_workdir("relaylab-deploy-run-")
    sink = SinkProcess(workdir / "sink")
    procs = {s: UnitProcess(d.unit(s), workdir / f"{s}.log", ports[s]) for s in SERVICES} if systemd else {}
    readme = None if systemd else ReadmeServices(d, workdir, ports)
    pf = DebianDefaultPostfix(workdir / "postfix", sink.port, d.policy, d.relaylab)
    try:
        sink.start()
        for p in procs.values():
            p.start()
        if readme is not None:
            readme.start()
        pf.start()
        yield Running(sink, procs, readme, pf, ports)
    finally:
        pf.stop()
        for p in procs.values():
            p.stop()
        if readme is not None:
            readme.stop()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def verdicts(d: Deployment, delivered: Path, keys: tuple[Path, Path]) -> list[str]:
    """dkimpy's verdict on each signature of `delivered`, run by the installed venv alone
    (PyNaCl is a runtime dependency)."""
    records = {f"{k.stem.split('.')[-1]}._domainkey.{DOMAIN}": k for k in keys}
    out = _run([str(d.prefix / "venv/bin/python"), "-c", VERIFY, str(delivered),
                *(f"{name}={key}" for name, key in records.items())]).stdout
    return out.split()


def test_deployed_relay_signs_counts_and_refuses_unauthenticated_relaying(
    deployed: Deployment, dkim_keys: tuple[Path, Path], redis_server: RedisServer
) -> None:
    d = deployed
    # -- keys, made by root as the README says, land readable by the service user ----
    for key in dkim_keys:
        st = key.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
            0, pwd.getpwnam(USER).pw_gid, 0o640)
    # -- the policy, edited: this host's Redis and ports, one subaccount ------------------
    ports = {s: free_port() for s in SERVICES}
    write_policy(d, redis_server.url, ports, {"traffic": "transactional"}, dkim_keys)
    unit = str(d.unit("milter"))

    # -- relaylab check: as the unit's User= --------------------------------------------
    res = d.cli("check", "--config", str(d.policy), "--unit", unit)
    assert f"files readable by {USER}: 4 of 4" in res.stdout, res.stdout + res.stderr

    with running(d, ports) as r:
        pf, sink = r.postfix, r.sink
        # The running services hold their ports: check still passes (before a reload).
        d.cli("check", "--config", str(d.policy), "--unit", unit)

        # -- the shipped lines on Debian's main.cf: no duplicate, no warning -----------
        main_cf = (pf.conf_dir / "main.cf").read_text()
        assert len(re.findall(r"(?m)^smtpd_relay_restrictions\s*=", main_cf)) == 1
        assert _run(["postconf", "-c", str(pf.conf_dir), "-n"]).stderr == ""
        assert pf.shipped_output.startswith("applied")

        # -- authenticated mail: relayed, signed twice, counted --------------------------
        message = (f"From: Shop <orders@{DOMAIN}>\r\nTo: bob@example.net\r\n"
                   "Subject: deployed\r\nMessage-ID: <d1@shop.example.com>\r\n\r\nhello\r\n")
        with SMTPSession(pf.submit_port) as s:
            assert s.auth_plain(LOGIN, PASSWORD).code == 235
            t = s.send(f"orders@{DOMAIN}", ["bob@example.net"], message.encode())
            assert t.accepted, t.steps
        (delivered,) = sink.wait_for(1, 30)
        assert verdicts(d, delivered, dkim_keys) == ["rsa-sha256:pass", "ed25519-sha256:pass"]
        assert f"queue_id={t.queue_id}" in r.log("milter")  # the milter saw it
        # enable_long_queue_ids: never reused, so logd cannot pin a line on an older message
        assert re.fullmatch(r"[0-9B-Zb-z]{10,}z[0-9B-Zb-z]+", t.queue_id or ""), t.queue_id
        usage = d.cli("limits", "show", "--config", str(d.policy), "deploy-shop").stdout
        assert re.search(r"(?m)^deploy-shop\s+shared\s+1/60000\s", usage), usage  # policyd counted

        # -- no AUTH, no relaying: neither on 25 nor on 587 ------------------------------
        for port, text in ((pf.smtp_port, "Relay access denied"),  # reject_unauth_destination
                           (pf.submit_port, "Access denied")):     # submission: AUTH or reject
            with SMTPSession(port) as s:
                assert s.mail(f"orders@{DOMAIN}").code == 250
                rcpt = s.rcpt("bob@example.net")
                assert rcpt.code == 554 and rcpt.text.startswith("5.7.1"), (port, rcpt)
                assert text in rcpt.text, (port, rcpt)
        assert len(sink.messages()) == 1


LINK = "https://shop.example.com/sale?cat=shoes&size=42"
NEWS_HTML = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Sale</title></head>
<body>
<p>Our sale starts now: <a href="{LINK.replace("&", "&amp;")}">shoes</a>.</p>
<!-- footer </body> -->
</body></html>
"""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_deployed_relay_tracks_html_links_and_the_installed_tracker_redirects_and_records_the_click(
    deployed: Deployment, dkim_keys: tuple[Path, Path], redis_server: RedisServer
) -> None:
    d = deployed
    # The services run on the venv install.sh built: the system Python (Debian 12: 3.11.2).
    venv_python = _run([str(d.prefix / "venv/bin/python"), "-c", "import sys; print(sys.version)"]).stdout
    assert venv_python == _run(["/usr/bin/python3", "-c", "import sys; print(sys.version)"]).stdout
    ports = {s: free_port() for s in SERVICES}
    write_policy(d, redis_server.url, ports, {
        "traffic": "marketing", "tracking": {"opens": True, "clicks": True}}, dkim_keys)
    base = f"http://127.0.0.1:{ports['tracker']}"
    message = EmailMessage()
    message["From"] = f"Shop <news@{DOMAIN}>"
    message["To"] = "reader@example.org"
    message["Subject"] = "Sale"
    message["Message-ID"] = "<sale-1@shop.example.com>"
    message.set_content(f"Our sale starts now: {LINK}\n")
    message.add_alternative(NEWS_HTML, subtype="html", cte="quoted-printable")
    events = redis.Redis.from_url(redis_server.url, decode_responses=True)
    events.delete(events_key("deploy-shop"))
    with running(d, ports, systemd=False) as r:  # as in a container
        with SMTPSession(r.postfix.submit_port) as s:
            assert s.auth_plain(LOGIN, PASSWORD).code == 235
            t = s.send(f"news@{DOMAIN}", ["reader@example.org"], message.as_bytes(policy=email.policy.SMTP))
            assert t.accepted, t.steps
        (delivered,) = r.sink.wait_for(1, 30)

        # -- signed (after the rewriting) and tracked --------------------------------------
        assert verdicts(d, delivered, dkim_keys) == ["rsa-sha256:pass", "ed25519-sha256:pass"]
        milter_log = r.log("milter")
        line = next(ln for ln in milter_log.splitlines() if f"queue_id={t.queue_id}" in ln and "links=" in ln)
        assert "rewrite_error" not in line and " links=1 " in f"{line} " and "pixels=1" in line, line
        parsed = email.message_from_bytes(delivered.read_bytes(), policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        html_part = parsed.get_body(("html",))
        assert html_part is not None
        html = html_part.get_content()
        hrefs = re.findall(r'href="([^"]*)"', html)
        assert len(hrefs) == 1 and hrefs[0].startswith(f"{base}/c/"), html
        assert "shop.example.com/sale" not in html
        # the open pixel before the real </body>, not the one in the comment
        assert re.search(rf'<img src="{re.escape(base)}/o/[^"]+"[^>]*/></body></html>', html), html

        # -- the installed tracker: a redirect to the link as written, and a click ---------
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            opener.open(hrefs[0].replace("&amp;", "&"), timeout=10)
            raise AssertionError("the tracker did not redirect")
        except urllib.error.HTTPError as e:
            assert e.code == 302 and e.headers["Location"] == LINK, (e.code, dict(e.headers))
        deadline = time.monotonic() + 10
        stream = events_key("deploy-shop")
        while not (clicks := [f for _, f in events.xrange(stream) if f["type"] == "click"]):
            assert time.monotonic() < deadline, "no click recorded"
            time.sleep(0.05)
        assert [(c["url"], c["recipient"]) for c in clicks] == [(LINK, "reader@example.org")]
        assert re.search(r"(?m) event=click subaccount=deploy-shop ", r.log("tracker"))

        # -- `relaylab reload` without systemd, from a checkout: the installed policy -----
        env = {k: v for k, v in os.environ.items() if k != "RELAYLAB_CONFIG"}
        res = subprocess.run([str(d.relaylab), "reload"], cwd=REPO, capture_output=True, text=True, env=env)
        assert res.returncode == 0 and res.stdout.startswith("reload requested"), res.stdout + res.stderr
        deadline = time.monotonic() + 15
        while not all(" event=reloaded " in r.log(s) for s in SERVICES):
            assert time.monotonic() < deadline, {s: r.log(s)[-500:] for s in SERVICES}
            time.sleep(0.1)
    events.close()


# Run by the installed venv's python: dkimpy's verdict for each signature, "alg:pass".
VERIFY = """
import sys, dkim
from pathlib import Path
from relaylab.dkim.keys import dns_record_value, load_private_key
from relaylab.policy.model import DkimAlgorithm
msg = Path(sys.argv[1]).read_bytes()
records = {}
for arg in sys.argv[2:]:
    name, _, key = arg.partition("=")
    for alg in DkimAlgorithm:
        try:
            records[name] = dns_record_value(load_private_key(Path(key), alg)).encode()
        except Exception:
            continue
d = dkim.DKIM(msg)
head = msg.split(b"\\r\\n\\r\\n", 1)[0]
n = sum(1 for l in head.split(b"\\r\\n") if l.lower().startswith(b"dkim-signature:"))
for i in range(n):
    ok = d.verify(idx=i, dnsfunc=lambda q, timeout=5: records.get(q.decode().rstrip(".")))
    print(f"{d.signature_fields[b'a'].decode()}:{'pass' if ok else 'fail'}")
"""


def test_check_fails_when_the_service_user_cannot_read_a_key(deployed: Deployment) -> None:
    """Root can read everything; the milter's user may not: check as the unit's User=."""
    key = deployed.etc / "keys/unreadable.key"
    d = deployed
    d.cli("dkim", "keygen", "--domain", "x.example", "--selector", "u", "--out", str(key),
          "--force")
    policy = yaml.safe_load(d.policy.read_text())
    policy["subaccounts"] = {"x": {"logins": ["x@relay.test"], "traffic": "transactional",
                                   "domains": {"x.example": {
        "dkim": [{"selector": "u", "key": str(key)}]}}}}
    bad = d.etc / "unreadable.yaml"
    bad.write_text(yaml.safe_dump(policy))
    os.chown(bad, 0, pwd.getpwnam(USER).pw_gid)
    key.chmod(0o600)  # as keygen used to leave it, root:root 0600
    try:
        res = d.cli("check", "--config", str(bad), "--unit", str(d.unit("milter")), check=False)
        assert res.returncode == 1
        assert (f"error: DKIM key u._domainkey.x.example {key} is not readable by user {USER}: "
                "Permission denied") in res.stderr
        # As root (who runs `relaylab check`) the same policy is fine.
        ok = d.cli("check", "--config", str(bad), "--as-user", "root", check=False)
        assert "not readable" not in ok.stderr
    finally:
        key.unlink()
        bad.unlink()


def test_install_again_keeps_the_policy_fixes_key_permissions_and_replaces_an_old_symlink(
    deployed: Deployment
) -> None:
    d = deployed
    edited = d.policy.read_text() + "# edited by the operator\n"
    d.policy.write_text(edited)
    stray = d.etc / "keys/copied-in.key"
    stray.write_text("x")
    stray.chmod(0o604)
    os.chown(stray, 0, 0)
    units = {s: d.unit(s).read_text() for s in SERVICES}
    wrapper = d.relaylab.read_text()
    venv_command = (d.prefix / "venv/bin/relaylab").read_text()
    d.relaylab.unlink()
    d.relaylab.symlink_to(d.prefix / "venv/bin/relaylab")  # as install.sh used to leave it
    try:
        res = install(d.root)
        assert "kept the existing policy" in res.stdout
        assert d.policy.read_text() == edited
        assert {s: d.unit(s).read_text() for s in SERVICES} == units
        # the symlink is replaced by the wrapper, the venv's command it pointed at kept
        assert not d.relaylab.is_symlink() and d.relaylab.read_text() == wrapper
        assert (d.prefix / "venv/bin/relaylab").read_text() == venv_command
        st = stray.stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam(USER).pw_gid, 0o640)
    finally:
        stray.unlink()


def test_uninstall_removes_the_install_and_its_user_but_keeps_policy_and_keys() -> None:
    user = OTHER_USER
    root = make_workdir("relaylab-uninstall-")
    try:
        install(root, user)
        res = uninstall(root, user)
        assert f"kept {root}/etc/relaylab" in res.stdout
        assert not (root / "opt/relaylab").exists()
        assert not (root / "usr/local/bin/relaylab").exists()
        assert list((root / "etc/systemd/system").iterdir()) == []
        assert (root / "etc/relaylab/relaylab.yaml").is_file()
        assert (root / "etc/relaylab/keys/tracker.k2026a.secret").is_file()
        assert subprocess.run(["getent", "passwd", user], capture_output=True).returncode == 2
    finally:
        drop_user(user)
        shutil.rmtree(root, ignore_errors=True)


def test_install_refuses_unknown_arguments_with_usage_status() -> None:
    res = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown argument: --frobnicate" in res.stderr
