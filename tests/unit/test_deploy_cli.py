"""The deployment commands without a deployment: `relaylab postfix config`, what
`relaylab check` adds (Redis, ports, files as another user), the default config path, the
exit-code convention (1 = the operation failed, 2 = usage), `relaylab demo --workdir`
refusing other people's directories, and PyNaCl as a runtime dependency. The whole
deployment is tests/e2e/test_deploy_e2e.py."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from relaylab import postfixconf
from relaylab.cli import main
from relaylab.devstack.demo import WORKDIR_MARKER, WorkdirRefused, prepare_workdir
from relaylab.devstack.ports import free_port
from relaylab.devstack.workdir import make_workdir
from relaylab.dkim.keygen import write_private_key
from relaylab.policy.loader import INSTALLED_PATH, default_config_path, load_policy
from relaylab.startcheck import unit_user

REPO = Path(__file__).resolve().parents[2]


def policy_file(tmp_path: Path, *, redis_port: int | None = None, milter_port: int | None = None,
                extra: str = "") -> Path:
    key = tmp_path / "keys" / "k.key"
    if not key.exists():
        write_private_key(ed25519.Ed25519PrivateKey.generate(), key)
    path = tmp_path / "relaylab.yaml"
    path.write_text(f"""\
redis: {{url: "redis://127.0.0.1:{redis_port or free_port()}/0"}}
milter: {{listen: "127.0.0.1:{milter_port or free_port()}"}}
policyd: {{listen: "127.0.0.1:{free_port()}"}}
subaccounts:
  shop:
    logins: [shop@relay.example.net]
    traffic: transactional
    domains:
      shop.example.com:
        dkim: [{{selector: e1, key: keys/k.key, algorithm: ed25519-sha256}}]
{extra}""")
    return path


# ---------------------------------------------------------------- relaylab postfix config


def test_postfix_config_lets_authenticated_clients_relay_and_policyd_see_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old snippet put reject_unauth_destination first: 554 Relay access denied for
    every authenticated sender. Now: SASL permits relaying, and policyd is alone in the
    recipient list, so no permit can skip it."""
    path = policy_file(tmp_path, milter_port=18891)
    assert main(["postfix", "config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    settings = dict(
        shlex.split(line)[2].split(" = ", 1) for line in out.splitlines()
        if line.startswith("postconf -e "))
    relay = [r.strip() for r in settings["smtpd_relay_restrictions"].split(",")]
    assert relay == ["permit_sasl_authenticated", "reject_unauth_destination"]
    policy_port = load_policy(path, check_keys=False).policyd.listen_port
    service = (f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=10s, "
               "default_action=DEFER_IF_PERMIT }")
    assert settings["smtpd_recipient_restrictions"] == service
    assert settings["smtpd_end_of_data_restrictions"] == service
    assert settings["smtpd_milters"] == "inet:127.0.0.1:18891"
    assert settings["milter_default_action"] == "tempfail"
    assert settings["enable_long_queue_ids"] == "yes"  # logd's correlation: ids never reused
    assert "smtpd_data_restrictions" not in settings  # only with policyd.usage_header
    # Every command line is what --apply runs (the -M one only if the entry is missing).
    run = [shlex.join(c.argv) for c in postfixconf.commands(load_policy(path, check_keys=False))]
    printed = [line.split(" || ")[-1] for line in out.splitlines() if "postconf -" in line]
    assert printed == run
    assert ("postconf -M submission/inet | grep -q . || postconf -M "
            "'submission/inet = submission inet n - y - - smtpd'") in out


def test_postfix_config_adds_data_restrictions_for_the_usage_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = policy_file(tmp_path)
    text = path.read_text().replace("policyd: {listen:", "policyd: {usage_header: true, listen:")
    path.write_text(text)
    assert main(["postfix", "config", "--config", str(path)]) == 0
    assert "postconf -e 'smtpd_data_restrictions = check_policy_service {" in capsys.readouterr().out


def test_readme_shows_what_postfix_config_prints_for_the_shipped_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "keys").mkdir()
    (conf / "keys" / "tracker.k2026a.secret").write_text("k" * 48)
    assert main(["postfix", "config", "--config", str(conf / "relaylab.yaml")]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "postconf -" in line]
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("5. **Point Postfix at the services**"):]
    block = block[block.index("```sh\n") + 6:]
    block = block[:block.index("```")]
    assert [line.strip() for line in block.strip().splitlines()] == printed


# ---------------------------------------------------------------- relaylab check


def test_check_warns_with_the_url_when_redis_does_not_answer_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    path = policy_file(tmp_path, redis_port=port)
    assert main(["check", "--config", str(path), "--unit", str(tmp_path / "none")]) == 0
    err = capsys.readouterr().err
    assert f"warning: Redis at redis://127.0.0.1:{port}/0 does not answer" in err
    # No tracker section: its unit would exit at start.
    assert "warning: tracker: no base_url or no keys" in err


def test_check_fails_when_another_program_holds_a_listen_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        path = policy_file(tmp_path, milter_port=port)
        assert main(["check", "--config", str(path), "--unit", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: milter.listen 127.0.0.1:{port} cannot be used by pid {os.getpid()} "
                     r"\(.*\): address in use", err), err


def test_check_takes_the_user_from_the_units_user_line(tmp_path: Path) -> None:
    unit = tmp_path / "relaylab-milter.service"
    unit.write_text("[Service]\nUser=nobody\nGroup=nogroup\nExecStart=/bin/true\n")
    assert unit_user(unit) == "nobody"
    assert unit_user(tmp_path / "missing.service") is None


def test_check_as_a_user_who_cannot_read_the_key_fails_naming_it(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """Root (running `relaylab check`) can read everything; the service user may not."""
    d = make_workdir("relaylab-check-")  # 0755: only the key is out of nobody's reach
    try:
        path = policy_file(d)
        path.chmod(0o644)
        (d / "keys").chmod(0o755)  # the key itself stays 0640 root:root
        assert main(["check", "--config", str(path), "--as-user", "nobody"]) == 1
        err = capsys.readouterr().err
        assert (f"error: DKIM key e1._domainkey.shop.example.com {d}/keys/k.key is not "
                "readable by user nobody: Permission denied") in err
        assert "the policy file" not in err
        assert main(["check", "--config", str(path), "--as-user", "root"]) == 0
    finally:
        shutil.rmtree(d)


# ---------------------------------------------------------------- default config path


def test_default_config_is_the_installed_one_outside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAYLAB_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_config_path() == INSTALLED_PATH == Path("/etc/relaylab/relaylab.yaml")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/relaylab.yaml").write_text("{}\n")
    assert default_config_path() == Path("conf/relaylab.yaml")
    monkeypatch.setenv("RELAYLAB_CONFIG", "/x/y.yaml")
    assert default_config_path() == Path("/x/y.yaml")


# ---------------------------------------------------------------- exit codes


def test_usage_errors_exit_2_and_failed_operations_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["check", "--no-such-option"])
    assert e.value.code == 2
    missing = str(tmp_path / "missing.yaml")
    for argv in (["dns", "check", "--config", missing],
                 ["limits", "show", "--config", missing],
                 ["blacklist", "list", "--config", missing, "--global"],
                 ["postfix", "config", "--config", missing],
                 ["check", "--config", missing]):
        try:
            rc = main(argv)
        except SystemExit as exit_:
            rc = exit_.code  # type: ignore[assignment]
        assert rc == 1, argv
    path = policy_file(tmp_path)
    # A Redis that does not answer and a subaccount that does not exist: failures, not usage.
    assert main(["limits", "show", "--config", str(path), "nope"]) == 1
    assert main(["blacklist", "list", "--config", str(path), "--global"]) == 1
    capsys.readouterr()


# ---------------------------------------------------------------- relaylab demo --workdir


def test_demo_refuses_a_non_empty_directory_it_did_not_create(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "thesis.tex"
    precious.write_text("years of work")
    assert main(["demo", "--workdir", str(tmp_path), "--once"]) == 1
    assert "refusing to delete it" in capsys.readouterr().err
    assert precious.read_text() == "years of work"
    (tmp_path / "f").mkdir()
    with pytest.raises(WorkdirRefused):
        prepare_workdir(tmp_path / "thesis.tex")  # not a directory


def test_demo_empties_its_own_workdir_and_takes_an_empty_one(tmp_path: Path) -> None:
    own = tmp_path / "run"
    prepare_workdir(own)
    assert (own / WORKDIR_MARKER).is_file()
    (own / "old.log").write_text("from the last run")
    prepare_workdir(own)
    assert sorted(p.name for p in own.iterdir()) == [WORKDIR_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty)
    assert (empty / WORKDIR_MARKER).is_file()


# ---------------------------------------------------------------- PyNaCl


def test_pynacl_is_a_runtime_dependency() -> None:
    """`relaylab demo` verifies Ed25519 signatures with dkimpy, which needs PyNaCl: a
    plain install (no test extras) must have it."""
    requires = importlib.metadata.requires("relaylab") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert any(r.lower().startswith("pynacl") for r in runtime), runtime
