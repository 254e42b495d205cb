"""relaylab.policy.loader: every mistake is reported with file, line and key; a good file
gives a typed, frozen Policy; `relaylab check` prints either a summary or the problems."""

from __future__ import annotations

import shutil
import socket
import textwrap
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaylab.cli import main
from relaylab.policy.loader import ConfigError, Problem, load_policy
from relaylab.policy.model import (
    DkimAlgorithm,
    MissingKeyAction,
    Policy,
    SoftBounceBlock,
    TrafficType,
    UnauthenticatedAction,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONF = REPO / "conf" / "relaylab.yaml"


@attrs.frozen
class Keys:
    rsa: Path
    ed: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    nocrypt = serialization.NoEncryption()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    (d / "rsa.pem").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, nocrypt))
    (d / "ed.pem").write_bytes(ed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, nocrypt))
    return Keys(d / "rsa.pem", d / "ed.pem")


def write(tmp_path: Path, text: str, keys: Keys | None = None, name: str = "relaylab.yaml") -> Path:
    text = textwrap.dedent(text)
    if keys is not None:
        text = text.replace("RSA_KEY", str(keys.rsa)).replace("ED_KEY", str(keys.ed))
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based number of the only line of `path` containing `needle`."""
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"{needle!r} must occur on exactly one line, found {lines}"
    return lines[0]


def problems(path: Path, *, check_keys: bool = True) -> list[Problem]:
    with pytest.raises(ConfigError) as excinfo:
        load_policy(path, check_keys=check_keys)
    found = excinfo.value.problems
    assert found, "ConfigError without problems"
    assert str(excinfo.value) == "\n".join(str(p) for p in found)
    return found


def only(found: list[Problem]) -> Problem:
    assert len(found) == 1, found
    return found[0]


# A valid subaccount to embed in the error cases; lines 1-9 of each file.
VALID_HEAD = """\
subaccounts:
  shop:
    logins: [shop@relay.example.net]
    traffic: transactional
    domains:
      shop.example.com:
        dkim:
          - selector: r1
            key: RSA_KEY
"""


# ---------------------------------------------------------------- one test per error kind


def test_unknown_top_level_key_names_its_line(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "loging:\n  level: debug\n", keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 10, "loging")
    assert "unknown key" in p.message and "subaccounts" in p.message


def test_misspelt_key_inside_subaccount_is_reported_not_ignored(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD.replace("    traffic:", "    trafic:"), keys)
    found = problems(path)
    typo = next(p for p in found if p.key == "subaccounts.shop.trafic")
    assert (typo.file, typo.line) == (path, line_of(path, "trafic:"))
    assert "unknown key" in typo.message and "traffic" in typo.message
    # ...and the required key it was meant to be is reported missing.
    assert any(p.key == "subaccounts.shop" and "missing traffic" in p.message for p in found)


def test_hourly_limit_must_be_an_integer(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "plans:\n  gold:\n    hourly_limit: lots\n", keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 12, "plans.gold.hourly_limit")
    assert "expected an integer" in p.message and "'lots'" in p.message


def test_milter_workers_must_be_at_least_one(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "milter:\n  workers: 0\n", keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 11, "milter.workers")
    assert "must be >= 1" in p.message
    assert load_policy(write(tmp_path, VALID_HEAD, keys)).milter.workers == 1
    two = write(tmp_path, VALID_HEAD + "milter:\n  workers: 2\n", keys, name="two.yaml")
    assert load_policy(two).milter.workers == 2


def test_milter_header_caps_default_and_are_checked_with_file_line_and_key(
        tmp_path: Path, keys: Keys) -> None:
    default = load_policy(write(tmp_path, VALID_HEAD, keys)).milter
    assert (default.max_headers, default.max_header_bytes) == (1000, 1 << 20)
    path = write(tmp_path, VALID_HEAD + "milter:\n  max_headers: 10\n"
                 "  max_header_bytes: \"1MiB\"\n", keys)
    found = problems(path)
    assert [(p.file, p.line, p.key) for p in found] == [
        (path, 11, "milter.max_headers"), (path, 12, "milter.max_header_bytes")]
    assert "must be >= 50" in found[0].message and "expected an integer" in found[1].message
    ok = write(tmp_path, VALID_HEAD + "milter:\n  max_headers: 5000\n"
               "  max_header_bytes: 4_194_304\n", keys, name="ok.yaml")
    m = load_policy(ok).milter
    assert (m.max_headers, m.max_header_bytes) == (5000, 4 << 20)


def test_logins_must_be_a_list(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD.replace("[shop@relay.example.net]", "shop@relay.example.net"), keys)
    found = problems(path)
    assert found[0] == Problem(path, 3, "subaccounts.shop.logins",
                               "expected a list, got 'shop@relay.example.net'")
    assert all(p.line == 3 and p.key == "subaccounts.shop.logins" for p in found)


def test_opens_as_quoted_yes_string_is_not_a_boolean(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + '    tracking:\n      opens: "yes"\n', keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 11, "subaccounts.shop.tracking.opens")
    assert "expected true or false" in p.message and "'yes'" in p.message


def test_traffic_must_be_a_known_type(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD.replace("traffic: transactional", "traffic: newsletter"), keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 4, "subaccounts.shop.traffic")
    assert "transactional, marketing" in p.message and "'newsletter'" in p.message


def test_missing_key_file(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_HEAD.replace("RSA_KEY", "keys/absent.key"))
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 9, "subaccounts.shop.domains.shop.example.com.dkim[0].key")
    assert "cannot read key file" in p.message and "No such file" in p.message
    assert str(tmp_path / "keys" / "absent.key") in p.message
    # Without key checks the same file loads.
    assert load_policy(path, check_keys=False).subaccounts[0].name == "shop"


def test_key_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    path = write(tmp_path, VALID_HEAD.replace("RSA_KEY", "keys"))
    p = only(problems(path))
    assert (p.line, p.key) == (9, "subaccounts.shop.domains.shop.example.com.dkim[0].key")
    assert "cannot read key file" in p.message and "directory" in p.message


def test_key_file_with_garbage_content(tmp_path: Path) -> None:
    (tmp_path / "garbage.key").write_text("-----BEGIN PRIVATE KEY-----\nnot base64!\n")
    path = write(tmp_path, VALID_HEAD.replace("RSA_KEY", "garbage.key"))
    p = only(problems(path))
    assert (p.line, p.key) == (9, "subaccounts.shop.domains.shop.example.com.dkim[0].key")
    assert "not a usable rsa-sha256 private key" in p.message


def test_rsa_key_where_ed25519_is_declared(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD.replace(
        "            key: RSA_KEY\n",
        "            key: RSA_KEY\n            algorithm: ed25519-sha256\n"), keys)
    p = only(problems(path))
    assert (p.line, p.key) == (9, "subaccounts.shop.domains.shop.example.com.dkim[0].key")
    assert "expected an Ed25519 private key" in p.message and "RSA" in p.message


def test_ed25519_key_where_rsa_is_declared(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD.replace("RSA_KEY", "ED_KEY"), keys)
    p = only(problems(path))
    assert (p.line, p.key) == (9, "subaccounts.shop.domains.shop.example.com.dkim[0].key")
    assert "expected an RSA private key" in p.message


TWO_SUBACCOUNTS = VALID_HEAD + """\
  news:
    logins:
      - news@relay.example.net
      - SHOP@Relay.Example.NET
    traffic: marketing
    domains:
      news.example.com:
        dkim:
          - {selector: r1, key: RSA_KEY}
"""


def test_login_mapped_twice_case_insensitively(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, TWO_SUBACCOUNTS, keys)
    p = only(problems(path))
    assert p.key == "subaccounts.news.logins"
    assert "'SHOP@Relay.Example.NET'" in p.message and "already mapped" in p.message
    assert "'shop'" in p.message
    assert p.file == path


def test_login_mapped_twice_points_at_the_duplicate_login_line(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, TWO_SUBACCOUNTS, keys)
    p = only(problems(path))
    assert p.line == line_of(path, "SHOP@Relay.Example.NET")


def test_domain_without_dkim_keys(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "      other.example.com:\n        dkim: []\n", keys)
    p = only(problems(path))
    assert (p.line, p.key) == (11, "subaccounts.shop.domains.other.example.com.dkim")
    assert "at least one DKIM key" in p.message


def test_domain_with_empty_mapping_has_no_keys_either(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "      other.example.com: {}\n", keys)
    p = only(problems(path))
    assert (p.line, p.key) == (10, "subaccounts.shop.domains.other.example.com.dkim")
    assert "at least one DKIM key" in p.message


SAME_DOMAIN_TWICE = VALID_HEAD + """\
  news:
    logins: [news@relay.example.net]
    traffic: marketing
    domains:
      Shop.Example.COM:
        dkim:
          - {selector: SELECTOR, key: KEYFILE, algorithm: ALGORITHM}
"""


def shared_domain(tmp_path: Path, keys: Keys, selector: str, keyfile: str,
                  algorithm: str = "rsa-sha256") -> Path:
    text = SAME_DOMAIN_TWICE.replace("SELECTOR", selector).replace("KEYFILE", keyfile)
    return write(tmp_path, text.replace("ALGORITHM", algorithm), keys)


def test_one_domain_in_two_subaccounts_each_with_its_own_selector(tmp_path: Path, keys: Keys
                                                                   ) -> None:
    """Orders (transactional) and newsletters (marketing) from the same shop domain."""
    policy = load_policy(shared_domain(tmp_path, keys, "e2", "ED_KEY", "ed25519-sha256"))
    shop, news = policy.subaccount("shop"), policy.subaccount("news")
    assert shop is not None and news is not None
    shop_dom, news_dom = shop.domain("shop.example.com"), news.domain("shop.example.com")
    assert shop_dom is not None and news_dom is not None
    assert [(k.selector, k.path) for k in shop_dom.keys] == [("r1", keys.rsa)]
    assert [(k.selector, k.path) for k in news_dom.keys] == [("e2", keys.ed)]


def test_one_domain_in_two_subaccounts_may_share_a_selector_with_the_same_key_file(
        tmp_path: Path, keys: Keys) -> None:
    policy = load_policy(shared_domain(tmp_path, keys, "r1", "RSA_KEY"))
    assert [k.selector for k in policy.all_keys()] == ["r1", "r1"]


def test_one_selector_with_another_key_file_in_another_subaccount_is_refused(
        tmp_path: Path, keys: Keys) -> None:
    other = tmp_path / "other-rsa.pem"
    shutil.copy(keys.rsa, other)  # same content does not matter: a path is what tools compare
    path = shared_domain(tmp_path, keys, "r1", str(other))
    p = only(problems(path))
    assert (p.file, p.line) == (path, line_of(path, "other-rsa.pem"))
    assert p.key == "subaccounts.news.domains.shop.example.com.dkim"
    assert "selector 'r1' of shop.example.com is already used by subaccount 'shop'" in p.message
    assert str(keys.rsa) in p.message
    # The same refusal without reading keys: `relaylab dns check` and policyd agree.
    assert only(problems(path, check_keys=False)).message == p.message


def test_one_selector_with_another_algorithm_in_another_subaccount_is_refused(
        tmp_path: Path, keys: Keys) -> None:
    path = shared_domain(tmp_path, keys, "r1", "ED_KEY", "ed25519-sha256")
    p = only(problems(path))
    assert p.line == line_of(path, "selector: r1, key:")
    assert "already used by subaccount 'shop'" in p.message and "(rsa-sha256)" in p.message


def test_one_domain_listed_twice_in_one_subaccount_is_refused(tmp_path: Path, keys: Keys
                                                              ) -> None:
    path = write(tmp_path, VALID_HEAD + """\
      Shop.Example.COM.:
        dkim:
          - {selector: e1, key: ED_KEY, algorithm: ed25519-sha256}
""", keys)
    p = only(problems(path))
    assert (p.line, p.key) == (line_of(path, "Shop.Example.COM.:"),
                               "subaccounts.shop.domains.Shop.Example.COM.")
    assert "listed twice in this subaccount" in p.message


def test_one_selector_for_two_keys_of_a_domain_is_refused(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "          - {selector: r1, key: ED_KEY, "
                 "algorithm: ed25519-sha256}\n", keys)
    p = only(problems(path))
    assert (p.line, p.key) == (10, "subaccounts.shop.domains.shop.example.com.dkim[1].selector")
    assert "selector 'r1' is used twice for shop.example.com" in p.message


def test_unknown_plan(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD.replace("    traffic:", "    plan: gold\n    traffic:"), keys)
    p = only(problems(path))
    assert (p.line, p.key) == (4, "subaccounts.shop.plan")
    assert "unknown plan 'gold'" in p.message and "dedicated, shared" in p.message


def test_duplicate_yaml_key_is_an_error_not_last_wins(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, "redis:\n  url: redis://a/0\n  url: redis://b/0\n" + VALID_HEAD, keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key, p.message) == (path, 3, "redis.url", "duplicate key")


def test_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "redis:\n  url: redis://127.0.0.1/0\n  - oops\nsubaccounts: {}\n")
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 3, "-")
    assert p.message.startswith("YAML syntax:")


def test_control_character_is_a_problem_with_its_line(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "# pasted \x07 by accident\n", keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 10, "-")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here yet\n")
    assert only(problems(path)) == Problem(path, 1, "-", "the file is empty")


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, 0, "-")
    assert "cannot read config" in p.message and "No such file" in p.message


def test_several_problems_reported_together_in_line_order(tmp_path: Path, keys: Keys) -> None:
    # The walker visits milter before subaccounts; the report must follow the file.
    path = write(tmp_path, VALID_HEAD.replace("traffic: transactional", "traffic: bulk") + """\
    tracking:
      opens: maybe
milter:
  unauthenticated: drop
bogus: 1
""", keys)
    found = problems(path)
    assert [(p.line, p.key) for p in found] == [
        (4, "subaccounts.shop.traffic"),
        (11, "subaccounts.shop.tracking.opens"),
        (13, "milter.unauthenticated"),
        (14, "bogus"),
    ]
    assert all(p.file == path for p in found)


# ---------------------------------------------------------------- a good file


VALID = """\
redis:
  url: redis://127.0.0.1:6379/3
milter:
  listen: 127.0.0.1:9999
  unauthenticated: reject
  missing_key: tempfail
  subaccount_header: null
tracker:
  base_url: https://t.example.net/
  keys:
    - {id: k2, secret_file: keys/tracker.secret}
    - {id: k1, secret: "an-old-inline-secret-of-32-bytes-or-more"}
plans:
  shared:
    hourly_limit: 10
  gold:
    hourly_limit: 500
    max_sessions: 3
    retention_days: 30
    monthly_quota: 10_000
subaccounts:
  shop:
    logins: [Shop-TX@Relay.Example.NET, second@relay.example.net]
    plan: gold
    traffic: transactional
    domains:
      Shop.Example.com:
        dkim:
          - {selector: r1, key: keys/rsa.pem}
          - {selector: e1, key: keys/ed.pem, algorithm: ed25519-sha256}
    headers:
      X-Stream: orders
  news:
    logins: [news@relay.example.net]
    traffic: marketing
    domains:
      news.example.com:
        dkim:
          - {selector: r1, key: RSA_KEY}
    tracking:
      opens: true
      utm: {source: nl}
"""


@pytest.fixture
def valid_policy(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Policy:
    conf = tmp_path / "etc"
    (conf / "keys").mkdir(parents=True)
    shutil.copy(keys.rsa, conf / "keys" / "rsa.pem")
    shutil.copy(keys.ed, conf / "keys" / "ed.pem")
    (conf / "keys" / "tracker.secret").write_text("s" * 40 + "\n")
    path = write(conf, VALID, keys)
    # Relative key paths must not depend on the working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return load_policy(path)


def test_valid_file_gives_typed_policy(valid_policy: Policy, tmp_path: Path) -> None:
    p = valid_policy
    assert p.source == tmp_path / "etc" / "relaylab.yaml"
    assert p.redis_url == "redis://127.0.0.1:6379/3"
    assert (p.milter.listen_host, p.milter.listen_port) == ("127.0.0.1", 9999)
    assert p.milter.unauthenticated is UnauthenticatedAction.REJECT
    assert p.milter.missing_key is MissingKeyAction.TEMPFAIL
    shop = p.subaccount("shop")
    assert shop is not None
    assert shop.traffic is TrafficType.TRANSACTIONAL
    assert shop.logins == ("Shop-TX@Relay.Example.NET", "second@relay.example.net")
    assert shop.headers == (("X-Stream", "orders"),)
    dom = shop.domain("SHOP.example.COM")
    assert dom is not None and dom.name == "shop.example.com"
    assert [(k.selector, k.algorithm) for k in dom.keys] == [
        ("r1", DkimAlgorithm.RSA_SHA256), ("e1", DkimAlgorithm.ED25519_SHA256)]
    news = p.subaccount("news")
    assert news is not None and news.traffic is TrafficType.MARKETING
    assert news.tracking.opens is True and news.tracking.clicks is False
    assert news.tracking.utm.source == "nl" and news.tracking.utm.medium is None
    assert p.tracker.base_url == "https://t.example.net"  # the trailing slash goes
    assert [(k.id, k.secret) for k in p.tracker.keys] == [
        ("k2", b"s" * 40), ("k1", b"an-old-inline-secret-of-32-bytes-or-more")]
    assert len(p.all_keys()) == 3


def test_policy_is_frozen(valid_policy: Policy) -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        valid_policy.redis_url = "redis://elsewhere"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        valid_policy.subaccounts[0].plan.hourly_limit = 1  # type: ignore[misc]
    assert isinstance(valid_policy.subaccounts, tuple)


def test_default_and_overridden_plans(valid_policy: Policy, tmp_path: Path, keys: Keys) -> None:
    plans = {pl.name: pl for pl in valid_policy.plans}
    # "shared" redefined in the file: only hourly_limit given, the rest default.
    assert (plans["shared"].hourly_limit, plans["shared"].max_sessions,
            plans["shared"].retention_days) == (10, 50, 7)
    assert (plans["dedicated"].hourly_limit, plans["dedicated"].max_sessions,
            plans["dedicated"].retention_days) == (120_000, 50, 15)
    assert (plans["gold"].hourly_limit, plans["gold"].max_sessions, plans["gold"].retention_days,
            plans["gold"].monthly_quota) == (500, 3, 30, 10_000)
    shop, news = valid_policy.subaccount("shop"), valid_policy.subaccount("news")
    assert shop is not None and news is not None
    assert shop.plan == plans["gold"]
    assert news.plan == plans["shared"]  # no plan: -> shared (as redefined)

    # Without a plans: section the built-in defaults apply.
    policy = load_policy(write(tmp_path, VALID_HEAD, keys))
    defaults = {pl.name: (pl.hourly_limit, pl.max_sessions, pl.retention_days, pl.monthly_quota)
                for pl in policy.plans}
    assert defaults == {"shared": (60_000, 50, 7, None), "dedicated": (120_000, 50, 15, None)}
    assert policy.subaccounts[0].plan.name == "shared"


def test_subaccount_for_login_is_case_insensitive(valid_policy: Policy) -> None:
    shop = valid_policy.subaccount("shop")
    assert valid_policy.subaccount_for_login("shop-tx@relay.example.net") is shop
    assert valid_policy.subaccount_for_login("SHOP-TX@RELAY.EXAMPLE.NET") is shop
    assert valid_policy.subaccount_for_login("Second@Relay.example.net") is shop
    assert valid_policy.subaccount_for_login("nobody@relay.example.net") is None


def test_relative_key_paths_resolve_against_the_config_directory(
    valid_policy: Policy, tmp_path: Path
) -> None:
    shop = valid_policy.subaccount("shop")
    assert shop is not None
    assert [k.path for k in shop.domains[0].keys] == [
        tmp_path / "etc" / "keys" / "rsa.pem", tmp_path / "etc" / "keys" / "ed.pem"]
    assert Path.cwd() == tmp_path / "elsewhere"


def test_subaccount_header_null_disables_it(valid_policy: Policy, tmp_path: Path, keys: Keys) -> None:
    assert valid_policy.milter.subaccount_header is None
    default = load_policy(write(tmp_path, VALID_HEAD, keys))
    assert default.milter.subaccount_header == "X-Relaylab-Subaccount"
    assert default.milter.message_id_header == "X-Relaylab-Message-ID"


# ---------------------------------------------------------------- the shipped example


def shipped_copy(tmp_path: Path, *, token_key: bool) -> Path:
    """conf/ copied to tmp_path, with the tracker's token key file in place if asked."""
    conf = tmp_path / "conf"
    shutil.copytree(SHIPPED_CONF.parent, conf)
    if token_key:
        (conf / "keys").mkdir()
        (conf / "keys" / "tracker.k2026a.secret").write_text("k" * 48)
    return conf / "relaylab.yaml"


def test_shipped_example_loads_without_key_checks(tmp_path: Path) -> None:
    policy = load_policy(shipped_copy(tmp_path, token_key=True), check_keys=False)
    assert [s.name for s in policy.subaccounts] == ["shop-transactional", "shop-newsletter"]
    assert {pl.name for pl in policy.plans} == {"shared", "dedicated", "free"}
    assert policy.dns.spf_include == "_spf.relay.example.net"
    assert policy.subaccount_for_login("shop-news@relay.example.net") is policy.subaccounts[1]


def test_shipped_example_loads_fully_once_its_keys_exist(tmp_path: Path, keys: Keys) -> None:
    copy = shipped_copy(tmp_path, token_key=False)
    conf = copy.parent
    with pytest.raises(ConfigError) as excinfo:  # keys not generated yet
        load_policy(copy)
    assert len(excinfo.value.problems) == 4  # three DKIM keys and the tracker's token key
    (conf / "keys").mkdir()
    (conf / "keys" / "tracker.k2026a.secret").write_text("k" * 48)
    refs = load_policy(copy, check_keys=False).all_keys()
    assert len(refs) == 3
    for ref in refs:
        assert ref.path.is_relative_to(conf)
        ref.path.parent.mkdir(parents=True, exist_ok=True)
        src = keys.ed if ref.algorithm is DkimAlgorithm.ED25519_SHA256 else keys.rsa
        shutil.copy(src, ref.path)
    policy = load_policy(copy)
    sub = policy.subaccount("shop-transactional")
    assert sub is not None and sub.plan.name == "dedicated"
    assert [k.selector for k in policy.all_keys()] == ["rl2026r", "rl2026e", "rl2026r"]


# ---------------------------------------------------------------- relaylab check


def test_cli_check_prints_a_summary(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID.replace("keys/rsa.pem", "RSA_KEY").replace("keys/ed.pem", "ED_KEY"), keys)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "tracker.secret").write_text("s" * 40)
    # No unit file: the check runs as this user, whatever is installed on the machine.
    assert main(["check", "--config", str(path), "--unit", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out
    for needle in ("subaccount shop:", "subaccount news:", "shop.example.com", "news.example.com",
                   "r1 (rsa-sha256)", "e1 (ed25519-sha256)", "plan gold", "marketing"):
        assert needle in out, needle


def test_cli_check_of_a_broken_file_exits_1_with_file_line_key(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID_HEAD.replace("traffic: transactional", "traffic: newsletter")
                 + "bogus: 1\n", keys)
    with pytest.raises(SystemExit) as excinfo:
        main(["check", "--config", str(path)])
    assert excinfo.value.code == 1
    captured = capsys.readouterr()
    assert "OK" not in captured.out
    err = captured.err.splitlines()
    assert err[0].startswith(f"error: {path}:4: subaccounts.shop.traffic: must be one of:")
    assert err[1].startswith(f"error: {path}:10: bogus: unknown key")
    assert "2 problem(s)" in err[2]


# ---------------------------------------------------------------- tracker and tracking

TRACKING = "    tracking:\n      clicks: true\n"


def tracker(body: str) -> str:
    return "tracker:\n" + body


GOOD_TRACKER = tracker('  base_url: https://t.example.net\n'
                       '  keys:\n    - {id: k1, secret: "0123456789abcdef0123456789abcdef"}\n')


def test_tracking_without_a_tracker_section_is_an_error(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + TRACKING, keys)
    p = only(problems(path))
    assert (p.line, p.key) == (10, "subaccounts.shop.tracking")
    assert "tracker section" in p.message


def test_tracking_with_a_tracker_loads(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, GOOD_TRACKER + VALID_HEAD + TRACKING
                 + "      plain_text: true\n      unsubscribe_mailto: unsub@shop.example.com\n", keys)
    policy = load_policy(path)
    shop = policy.subaccount("shop")
    assert shop is not None and shop.tracking.clicks and shop.tracking.plain_text
    assert shop.tracking.unsubscribe_mailto == "unsub@shop.example.com"
    assert policy.tracker.enabled and policy.tracker.keys[0].id == "k1"


def test_short_secret_is_refused_with_its_line(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, tracker('  base_url: https://t.example.net\n'
                                   '  keys:\n    - id: k1\n      secret: "short"\n') + VALID_HEAD, keys)
    p = only(problems(path))
    assert (p.line, p.key) == (5, "tracker.keys[0].secret")
    assert "at least 32 bytes" in p.message


def test_unreadable_secret_file_is_named(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, tracker('  base_url: https://t.example.net\n'
                                   '  keys:\n    - id: k1\n      secret_file: nope.secret\n')
                 + VALID_HEAD, keys)
    p = only(problems(path))
    assert (p.line, p.key) == (5, "tracker.keys[0].secret_file")
    assert "nope.secret" in p.message


@pytest.mark.parametrize("url", ["t.example.net", "ftp://t.example.net", "https://t.example.net/?a=1"])
def test_base_url_must_be_http_without_query(tmp_path: Path, keys: Keys, url: str) -> None:
    path = write(tmp_path, tracker(f'  base_url: "{url}"\n  keys:\n'
                                   '    - {id: k1, secret: "0123456789abcdef0123456789abcdef"}\n')
                 + VALID_HEAD, keys)
    p = only(problems(path))
    assert (p.line, p.key) == (2, "tracker.base_url")


def test_duplicate_key_ids_and_missing_secret(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, tracker('  base_url: https://t.example.net\n  keys:\n'
                                   '    - {id: k1, secret: "0123456789abcdef0123456789abcdef"}\n'
                                   '    - {id: k1, secret: "0123456789abcdef0123456789abcdeX"}\n'
                                   '    - {id: k3}\n') + VALID_HEAD, keys)
    found = problems(path)
    assert [(p.line, p.key) for p in found] == [(5, "tracker.keys[1].id"), (6, "tracker.keys[2]")]
    assert "used twice" in found[0].message and "exactly one of secret" in found[1].message


def test_bad_unsubscribe_mailto(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, GOOD_TRACKER + VALID_HEAD
                 + "    tracking:\n      unsubscribe_mailto: not-an-address\n", keys)
    p = only(problems(path))
    assert p.key == "subaccounts.shop.tracking.unsubscribe_mailto"
    assert p.line == 15


def test_cli_milter_on_a_taken_port_exits_1_naming_it(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relaylab.logfmt.setup_logging", lambda level: None)  # pytest's handlers stay
    path = write(tmp_path, VALID_HEAD, keys)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["milter", "--config", str(path), "--listen", f"127.0.0.1:{port}"]) == 1
    assert f"error: cannot listen on 127.0.0.1:{port}:" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_cli_workers_must_be_a_positive_integer(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    path = write(tmp_path, VALID_HEAD, keys)
    for service in ("milter", "tracker"):
        with pytest.raises(SystemExit) as excinfo:
            main([service, "--config", str(path), "--workers", value])
        assert excinfo.value.code == 2
        assert f"expects an integer >= 1, got '{value}'" in capsys.readouterr().err


# ------------------------------------------- connection limits and the tracker's event log


def test_connection_limits_and_event_log_load_with_defaults(tmp_path: Path, keys: Keys) -> None:
    p = load_policy(write(tmp_path, VALID_HEAD, keys))
    assert (p.milter.idle_timeout, p.milter.max_connections) == (1800, 1000)
    assert p.milter.max_message_bytes == 64 << 20
    assert (p.policyd.max_connections, p.policyd.request_timeout, p.policyd.idle_timeout) == (1000, 10, 600)
    a = p.api
    assert (a.keepalive_timeout, a.header_timeout, a.max_connections) == (75, 15, 1000)
    t = p.tracker
    assert (t.log_events, t.keepalive_timeout, t.header_timeout, t.max_connections) == (True, 75, 15, 1000)
    assert t.event_queue == 50_000
    set_ = write(tmp_path, VALID_HEAD + "milter:\n  idle_timeout: 600\n  max_connections: 20\n"
                 "  max_message_bytes: 2000000\n"
                 "policyd:\n  max_connections: 30\n  request_timeout: 3\n  idle_timeout: 60\n"
                 "api:\n  keepalive_timeout: 7\n  header_timeout: 4\n  max_connections: 50\n"
                 "tracker:\n  log_events: false\n  keepalive_timeout: 5\n  header_timeout: 2\n"
                 "  max_connections: 40\n  event_queue: 200_000\n", keys, name="set.yaml")
    p = load_policy(set_)
    assert (p.milter.idle_timeout, p.milter.max_connections, p.policyd.max_connections) == (600, 20, 30)
    t = p.tracker
    assert (t.log_events, t.keepalive_timeout, t.header_timeout, t.max_connections) == (False, 5, 2, 40)
    assert t.event_queue == 200_000
    assert p.milter.max_message_bytes == 2_000_000
    assert (p.policyd.request_timeout, p.policyd.idle_timeout) == (3, 60)
    assert (p.api.keepalive_timeout, p.api.header_timeout, p.api.max_connections) == (7, 4, 50)


@pytest.mark.parametrize(("section", "text", "message"), [
    ("milter", "  idle_timeout: 0\n", "must be >= 1"),
    ("milter", "  max_connections: lots\n", "expected an integer"),
    ("milter", '  idle_timeout: "600"\n', "expected an integer"),
    ("policyd", "  max_connections: -1\n", "must be >= 1"),
    ("policyd", "  request_timeout: 0\n", "must be >= 1"),
    ("milter", "  max_message_bytes: 1000\n", "must be >= 1048576"),
    ("api", "  header_timeout: soon\n", "expected an integer"),
    ("tracker", "  header_timeout: 1.5\n", "expected an integer"),
    ("tracker", "  keepalive_timeout: 0\n", "must be >= 1"),
    ("tracker", "  log_events: yes please\n", "expected true or false"),
    ("tracker", "  event_queue: 0\n", "must be >= 1"),
    ("tracker", "  event_queue: unbounded\n", "expected an integer"),
    ("tracker", "  event_queue: 1e5\n", "expected an integer"),
])
def test_connection_limits_are_checked_at_load(tmp_path: Path, keys: Keys, section: str, text: str,
                                               message: str) -> None:
    path = write(tmp_path, VALID_HEAD + f"{section}:\n{text}", keys)
    p = only(problems(path))
    key = text.split(":")[0].strip()
    assert (p.file, p.line, p.key) == (path, 11, f"{section}.{key}")
    assert message in p.message


# --- automatic suppression (plan keys) and logd -------------------------------------


def test_bounce_blocking_plan_keys_default_and_set(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "plans:\n  careful: {hourly_limit: 10, bounces_before_block: 3,"
                 " soft_bounce_block: {count: 5, days: 7}}\n", keys)
    policy = load_policy(path)
    plans = {p.name: p for p in policy.plans}
    assert plans["shared"].bounces_before_block == 1 and plans["shared"].soft_bounce_block is None
    assert plans["careful"].bounces_before_block == 3
    assert plans["careful"].soft_bounce_block == SoftBounceBlock(count=5, days=7)


@pytest.mark.parametrize(("value", "key", "message"), [
    ("bounces_before_block: 4", "plans.p.bounces_before_block", "must be 1, 2 or 3, got 4"),
    ("bounces_before_block: 0", "plans.p.bounces_before_block", "must be >= 1, got 0"),
    ("soft_bounce_block: {count: 5}", "plans.p.soft_bounce_block", "missing days"),
    ("soft_bounce_block: {count: 5, days: 0}", "plans.p.soft_bounce_block.days", "must be >= 1"),
    ("soft_bounce_block: {count: 5, days: 2, weeks: 1}", "plans.p.soft_bounce_block.weeks",
     "unknown"),
])
def test_bad_bounce_blocking_keys_name_file_line_and_key(tmp_path: Path, keys: Keys, value: str,
                                                          key: str, message: str) -> None:
    path = write(tmp_path, VALID_HEAD + f"plans:\n  p:\n    hourly_limit: 10\n    {value}\n", keys)
    p = only(problems(path))
    assert (p.file, p.line, p.key) == (path, line_of(path, value.split(":")[0]), key)
    assert message in p.message


def test_logd_section(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "logd: {log_file: postfix.log, name: mx1, start_at: start}\n",
                 keys)
    logd = load_policy(path).logd
    assert (logd.log_file, logd.name, logd.start_at) == (tmp_path / "postfix.log", "mx1", "start")
    bad = write(tmp_path, VALID_HEAD + "logd: {start_at: middle}\n", keys, name="bad.yaml")
    p = only(problems(bad))
    assert p.key == "logd.start_at" and "must be end or start" in p.message


def test_bounces_section(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path, VALID_HEAD + "bounces: {domain: Bounces.Relay.Test, secret: "
                 + "s" * 32 + ", listen: '127.0.0.1:9999'}\n", keys)
    b = load_policy(path).bounces
    assert (b.domain, b.secret, b.listen_port, b.enabled) == ("bounces.relay.test", b"s" * 32,
                                                             9999, True)
    bad = write(tmp_path, VALID_HEAD + "bounces: {domain: 'not a domain', secret: short}\n", keys,
                name="bad.yaml")
    found = {p.key: p.message for p in problems(bad)}
    assert "not a domain name" in found["bounces.domain"]
    assert "at least 32 bytes" in found["bounces.secret"]
