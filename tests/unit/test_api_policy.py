"""The policy's `api:` section (clients with hashed secrets and grants, file/line/key
errors), the secret hashing, `relaylab api keygen`, and the credentials cache."""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path

import pytest

import api.auth as auth
from relaylab.cli import main
from relaylab.policy.loader import ConfigError, Problem, load_policy
from relaylab.startcheck import listen_ports

HEAD = """\
subaccounts:
  shop:
    logins: [shop@relay.example.net]
    traffic: transactional
    domains:
      shop.example.com:
        dkim: [{selector: r1, key: keys/none.pem}]
  news:
    logins: [news@relay.example.net]
    traffic: marketing
    domains:
      shop.example.com:
        dkim: [{selector: r1, key: keys/none.pem}]
"""
HASH = auth.hash_secret("s3cret", n=2 ** 4)


def write(tmp_path: Path, tail: str) -> Path:
    path = tmp_path / "relaylab.yaml"
    path.write_text(HEAD + tail)
    return path


def problems(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as e:
        load_policy(path, check_keys=False)
    return e.value.problems


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_api_clients_load_with_grants_operator_and_listen(tmp_path: Path) -> None:
    path = write(tmp_path, f"""api:
  listen: 127.0.0.1:9100
  workers: 2
  clients:
    app: {{key: appkey-0001, secret_hash: "{HASH}", subaccounts: [shop]}}
    ops: {{key: opskey-0001, secret_hash: "{HASH}", operator: true}}
""")
    api = load_policy(path, check_keys=False).api
    assert (api.listen_host, api.listen_port, api.workers) == ("127.0.0.1", 9100, 2)
    app, ops = api.clients
    assert app.may_see("shop") and not app.may_see("news")
    assert ops.operator and ops.may_see("news")
    assert api.client("appkey-0001") is app and api.client("nope") is None


def test_grant_of_an_unknown_subaccount_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"""api:
  clients:
    app:
      key: appkey-0001
      secret_hash: "{HASH}"
      subaccounts: [shop, nosuch]
""")
    [p] = problems(path)
    assert (p.file, p.line, p.key) == (path, line_of(path, "nosuch"), "api.clients.app.subaccounts")
    assert "nosuch" in p.message


def test_a_plain_secret_instead_of_its_hash_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, """api:
  clients:
    app:
      key: appkey-0001
      secret_hash: "s3cret"
      subaccounts: [shop]
""")
    [p] = problems(path)
    assert (p.line, p.key) == (line_of(path, "secret_hash"), "api.clients.app.secret_hash")
    assert "relaylab api keygen" in p.message


def test_a_client_without_grant_or_operator_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f"""api:
  clients:
    app: {{key: appkey-0001, secret_hash: "{HASH}"}}
""")
    [p] = problems(path)
    assert p.key == "api.clients.app" and "operator" in p.message


def test_the_same_app_key_twice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f"""api:
  clients:
    one: {{key: appkey-0001, secret_hash: "{HASH}", subaccounts: [shop]}}
    two: {{key: appkey-0001, secret_hash: "{HASH}", subaccounts: [news]}}
""")
    [p] = problems(path)
    assert (p.line, p.key) == (line_of(path, "two:"), "api.clients.two.key")


def test_unknown_key_in_api_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "api:\n  port: 80\n")
    [p] = problems(path)
    assert p.key == "api.port"


def test_secret_hash_verifies_only_its_secret_and_salts_differ() -> None:
    a, b = auth.hash_secret("x", n=2 ** 4), auth.hash_secret("x", n=2 ** 4)
    assert a != b  # a salt of its own
    assert auth.verify_secret("x", a) and auth.verify_secret("x", b)
    assert not auth.verify_secret("y", a)
    assert not auth.verify_secret("x", "scrypt$16$8$1$!!$!!")


def test_default_hash_uses_scrypt_with_n_16384() -> None:
    h = auth.hash_secret("x")
    assert h.startswith("scrypt$16384$8$1$")
    assert auth.verify_secret("x", h)


def test_keygen_prints_a_pair_whose_yaml_loads_and_verifies(tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["api", "keygen", "--name", "shopapp", "--subaccount", "shop"]) == 0
    text = out.getvalue()
    key = text.split("app key: ")[1].split()[0]
    secret = text.split("secret:  ")[1].split()[0]
    yaml_part = text.split("`relaylab reload`\n")[1]
    assert secret not in yaml_part
    path = write(tmp_path, "api:\n  clients:\n" + yaml_part)
    policy = load_policy(path, check_keys=False)
    [client] = policy.api.clients
    assert client.key == key and client.subaccounts == {"shop"}
    assert auth.verify_secret(secret, client.secret_hash)


def test_verified_credentials_are_cached_so_the_kdf_runs_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, f"""api:
  clients:
    app: {{key: appkey-0001, secret_hash: "{HASH}", subaccounts: [shop]}}
""")
    settings = load_policy(path, check_keys=False).api
    calls = []
    real = auth.verify_secret
    monkeypatch.setattr(auth, "verify_secret", lambda s, h: calls.append(s) or real(s, h))
    a = auth.Authenticator(lambda: settings)
    assert a.cached(basic("appkey-0001", "s3cret"), 0.0) is None
    assert a.authenticate(basic("appkey-0001", "s3cret"), 0.0) is not None
    assert a.cached(basic("appkey-0001", "s3cret"), 1.0) is not None
    assert a.authenticate(basic("appkey-0001", "s3cret"), 1.0) is not None
    assert len(calls) == 1
    assert a.cached(basic("appkey-0001", "s3cret"), auth.CACHE_SECONDS + 1) is None
    assert a.authenticate(basic("appkey-0001", "wrong"), 2.0) is None
    assert a.cached(basic("appkey-0001", "wrong"), 2.0) is None


def test_check_knows_the_api_listen_port(tmp_path: Path) -> None:
    path = write(tmp_path, f"""api:
  listen: 127.0.0.1:9100
  clients:
    app: {{key: appkey-0001, secret_hash: "{HASH}", subaccounts: [shop]}}
""")
    assert ("api", "127.0.0.1", 9100) in listen_ports(load_policy(path, check_keys=False))
