"""`relaylab blacklist|whitelist ...` end to end against a real redis-server: the commands
are registered on a bare parser exactly as relaylab.cli wires them."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relaylab.devstack.ports import free_port
from relaylab.devstack.redis import RedisServer
from relaylab.suppression.cli import register

POLICY = """\
redis:
  url: {url}
subaccounts:
  shop:
    logins: [shop@relay.example.net]
    traffic: transactional
    domains:
      shop.example.com:
        dkim: [{{selector: s1, key: keys/none.key}}]
  news:
    logins: [news@relay.example.net]
    traffic: marketing
    domains:
      news.example.com:
        dkim: [{{selector: s1, key: keys/none.key}}]
"""


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Path:
    path = tmp_path / "relaylab.yaml"
    path.write_text(POLICY.format(url=redis_server.url))
    return path


class Cli:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        ap = argparse.ArgumentParser(prog="relaylab")
        register(ap.add_subparsers(dest="command", required=True))
        args = ap.parse_args([*argv, "--config", str(self.config)])
        self.capsys.readouterr()
        rc: int = args.func(args)
        out, err = self.capsys.readouterr()
        return rc, out, err


@pytest.fixture
def cli(config: Path, capsys: pytest.CaptureFixture[str], r: redis.Redis) -> Cli:
    return Cli(config, capsys)


def fields(r: redis.Redis, key: str) -> set[str]:
    keys: list[bytes] = r.hkeys(key)  # type: ignore[assignment]
    return {f.decode() for f in keys}


def test_add_show_list_remove(cli: Cli, r: redis.Redis) -> None:
    rc, out, _ = cli("blacklist", "add", "Bob@Example.COM", "--reason", "hardbounce",
                     "--comment", "550 5.1.1 user unknown", "--subaccount", "shop")
    assert rc == 0
    assert out == "added address bob@example.com to the blacklist of subaccount shop (hardbounce)\n"
    rc, out, _ = cli("blacklist", "add", "bob@example.com", "--reason", "manual", "--subaccount", "shop")
    assert rc == 0 and "already on the blacklist of subaccount shop: hardbounce since" in out
    rc, out, _ = cli("blacklist", "add", "@spam.example", "--reason", "spam_complaint", "--expires", "30",
                     "--global")
    assert rc == 0 and "added domain spam.example to the global blacklist" in out
    assert fields(r, "rl:{sub:shop}:bl") == {"a:bob@example.com"}
    assert fields(r, "rl:{global}:bl") == {"d:spam.example"}

    rc, out, _ = cli("blacklist", "show", "BOB@example.com", "--subaccount", "shop")
    assert rc == 0
    assert "bob@example.com (address) on the blacklist of subaccount shop" in out
    assert "reason:    hardbounce" in out and "comment:   550 5.1.1 user unknown" in out
    assert "whitelist: no entry overrides it" in out
    rc, out, _ = cli("blacklist", "show", "spam.example", "--global")
    assert rc == 0 and "expires:   20" in out

    rc, out, _ = cli("blacklist", "list", "--subaccount", "shop")
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("ADDRESS OR DOMAIN") and lines[1].startswith("bob@example.com ")
    assert "hardbounce" in lines[1] and lines[-1] == "1 of 1 entries on the blacklist of subaccount shop"

    rc, out, _ = cli("blacklist", "remove", "bob@example.com", "--subaccount", "shop")
    assert rc == 0 and out == "removed bob@example.com from the blacklist of subaccount shop\n"
    rc, _, err = cli("blacklist", "remove", "bob@example.com", "--subaccount", "shop")
    assert rc == 1 and err == "relaylab: bob@example.com is not on the blacklist of subaccount shop\n"
    rc, _, err = cli("blacklist", "show", "bob@example.com", "--subaccount", "shop")
    assert rc == 1 and "not on the blacklist" in err


def test_list_limit(cli: Cli) -> None:
    for i in range(5):
        cli("blacklist", "add", f"u{i}@example.com", "--reason", "manual", "--subaccount", "news")
    rc, out, _ = cli("blacklist", "list", "--limit", "2", "--subaccount", "news")
    assert rc == 0 and len(out.splitlines()) == 4
    assert out.splitlines()[-1] == "2 of 5 entries on the blacklist of subaccount news (--limit 0 shows all)"


def test_clean_errors(cli: Cli, tmp_path: Path) -> None:
    rc, _, err = cli("blacklist", "add", "x@example.com", "--reason", "manual", "--subaccount", "nope")
    assert rc == 1 and err == "relaylab: unknown subaccount 'nope' (configured: shop, news)\n"
    rc, _, err = cli("blacklist", "add", "foo@@bar", "--reason", "manual", "--global")
    assert rc == 1 and err == "relaylab: not an address: 'foo@@bar' (more than one @)\n"
    rc, _, err = cli("blacklist", "add", "x@example.com", "--reason", "manual", "--expires", "2001-01-01",
                     "--global")
    assert rc == 1 and "in the past" in err
    # Redis down: one line, no traceback
    cli.config.write_text(POLICY.format(url=f"redis://:secret@127.0.0.1:{free_port()}/0"))
    rc, _, err = cli("blacklist", "list", "--global")
    assert rc == 1 and err.startswith("relaylab: cannot reach Redis at redis://:***@127.0.0.1:")
    assert len(err.splitlines()) == 1 and "secret" not in err
    cli.config.write_text("redis: [")
    rc, _, err = cli("blacklist", "list", "--global")
    assert rc == 1 and "problem(s) in" in err


def test_import_reports_bad_lines_and_applies_none_of_them(cli: Cli, r: redis.Redis,
                                                          tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("address,reason,comment\n"
                   "a@example.com,hardbounce,first\n"
                   "foo@@bar,manual,bad address\n"
                   "b@example.com,,no reason\n"
                   "Example.ORG,manual,whole domain\n"
                   "gmail.com,manual,freemail domain\n"
                   "a@example.com,manual,duplicate\n"
                   "c@example.com,unsubscribe,\"comma, inside\"\n")
    rc, out, _ = cli("blacklist", "import", str(src), "--subaccount", "shop")
    assert rc == 1
    # the bad lines first, the summary last (as the README shows it)
    assert out.splitlines() == [
        "line 3: not an address: 'foo@@bar' (more than one @)",
        "line 4: missing reason for 'b@example.com'",
        "line 6: refused: gmail.com is a public mailbox provider's domain: blacklisting it would suppress "
        "every user of that provider (add single addresses, or use --force)",
        "added 3, already present 1, invalid 3",
    ]
    assert fields(r, "rl:{sub:shop}:bl") == {"a:a@example.com", "d:example.org", "a:c@example.com"}
    raw: Any = r.hget("rl:{sub:shop}:bl", "a:a@example.com")
    assert json.loads(raw)["c"] == "first"  # the first line wins

    rc, out, _ = cli("blacklist", "import", str(src), "--subaccount", "shop", "--force")
    assert out.splitlines()[-1] == "added 1, already present 4, invalid 2"


def test_import_bad_header_imports_nothing(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("address,reason,colour\na@example.com,manual,red\n")
    rc, _, err = cli("blacklist", "import", str(src), "--global")
    assert rc == 1 and "unknown column(s) 'colour'" in err and "nothing imported" in err
    assert r.exists("rl:{global}:bl") == 0
    rc, _, err = cli("blacklist", "import", str(tmp_path / "missing.csv"), "--global")
    assert rc == 1 and "cannot read" in err


def test_import_from_stdin(cli: Cli, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    data = "\ufeffx@example.com,manual\r\ny@example.com,other,c\r\n".encode()
    stdin = io.TextIOWrapper(io.BytesIO(data))
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, _ = cli("blacklist", "import", "-", "--subaccount", "news")
    assert rc == 0 and out == "added 2, already present 0, invalid 0\n"
    assert not stdin.closed
    assert fields(r, "rl:{sub:news}:bl") == {"a:x@example.com", "a:y@example.com"}


def test_export_round_trip(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    with src.open("w") as f:
        for i in range(3_000):
            f.write(f"user{i}@Example.com,hardbounce,\"bounce {i}, 550\"\n")
        f.write("bücher.de,spam_complaint,IDN\nłukasz@wp.pl,unsubscribe,multi\nline\n")
    rc, out, _ = cli("blacklist", "import", str(src), "--subaccount", "shop")
    assert rc == 1 and out.endswith("added 3002, already present 0, invalid 1\n")  # "line" alone

    exported = tmp_path / "out.csv"
    rc, _, err = cli("blacklist", "export", "--output", str(exported), "--subaccount", "shop")
    assert rc == 0 and "exported 3002 entries" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.csv")] == []  # no temp left
    rc, out, _ = cli("blacklist", "import", str(exported), "--subaccount", "news")
    assert rc == 0 and out == "added 3002, already present 0, invalid 0\n"
    assert r.hgetall("rl:{sub:shop}:bl") == r.hgetall("rl:{sub:news}:bl")  # same entries, same values

    rc, out, _ = cli("blacklist", "export", "--format", "jsonl", "--subaccount", "shop")
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3002
    assert {"address": "xn--bcher-kva.de", "kind": "domain", "reason": "spam_complaint", "comment": "IDN",
            "source": "cli"}.items() <= next(x for x in rows if x["kind"] == "domain").items()


def test_jsonl_export_imports_back_unchanged(cli: Cli, r: redis.Redis, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.csv"
    src.write_text("address,reason,comment,source,created_at,expires_at\n"
                   "Ann@Example.com,hardbounce,\"550 5.1.1, unknown\",bounce,2026-11-20T10:00:00Z,\n"
                   "bücher.de,spam_complaint,\"two\nlines\",cli,2026-11-21,2099-01-31\n"
                   "łukasz@wp.pl,unsubscribe,\"say \"\"hi\"\"\",unsubscribe-link,1795000000,\n")
    rc, out, _ = cli("blacklist", "import", str(src), "--subaccount", "shop")
    assert rc == 0 and out == "added 3, already present 0, invalid 0\n"
    exported = tmp_path / "all.jsonl"
    rc, _, err = cli("blacklist", "export", "--format", "jsonl", "-o", str(exported), "--subaccount", "shop")
    assert rc == 0 and "exported 3 entries" in err

    rc, out, _ = cli("blacklist", "import", str(exported), "--subaccount", "news")
    assert rc == 0 and out == "added 3, already present 0, invalid 0\n"
    assert r.hgetall("rl:{sub:shop}:bl") == r.hgetall("rl:{sub:news}:bl")  # same entries, same values
    # from standard input too (format told or not)
    for fmt in ([], ["--format", "jsonl"]):
        r.delete("rl:{global}:bl")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(exported.read_bytes())))
        rc, out, _ = cli("blacklist", "import", "-", *fmt, "--global")
        assert rc == 0 and out == "added 3, already present 0, invalid 0\n"
        assert r.hgetall("rl:{global}:bl") == r.hgetall("rl:{sub:shop}:bl")


def test_jsonl_import_reports_bad_lines(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"address": "a@example.com", "reason": "manual"}\n'
                   "\n"
                   '{"address": "b@example.com", "reason": "manual", "colour": "red"}\n'
                   '{"address": "example.org", "kind": "address", "reason": "manual"}\n'
                   '{"address": "c@example.com", "reason": "manual", "created_at": true}\n'
                   "not json\n"
                   '{"address": "d@example.com", "reason": "hardbounce", "expires_at": null}\n')
    rc, out, _ = cli("blacklist", "import", str(src), "--subaccount", "shop")
    assert rc == 1
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["line 3", "line 4", "line 5", "line 6"]
    assert "unknown field(s) 'colour'" in lines[0] and "kind 'address'" in lines[1]
    assert "created_at: expected a string or epoch seconds, got true" in lines[2]
    assert lines[3].startswith("line 6: not JSON")
    assert lines[-1] == "added 2, already present 0, invalid 4"
    assert fields(r, "rl:{sub:shop}:bl") == {"a:a@example.com", "a:d@example.com"}
    # a CSV file is not mistaken for JSON lines, nor the other way round when told
    rc, out, _ = cli("blacklist", "import", str(src), "--format", "csv", "--subaccount", "news")
    assert rc == 1 and out.endswith("added 0, already present 0, invalid 6\n")


def test_whitelist_list_shows_the_written_reason(cli: Cli) -> None:
    reason = "key customer: order confirmations must arrive, ticket OPS-1234 (approved by the CEO's office)"
    rc, _, _ = cli("whitelist", "add", "ceo@partner.example", "--reason", reason, "--subaccount", "shop")
    assert rc == 0
    rc, out, _ = cli("whitelist", "list", "--subaccount", "shop")
    header, row, total = out.splitlines()
    assert rc == 0 and header.split()[-1] == "REASON" and "COMMENT" not in header
    assert row.startswith("ceo@partner.example ") and row.endswith(" " + reason)  # whole, not cut
    assert "manual" not in row  # the enum reason every whitelist entry has says nothing
    assert total == "1 of 1 entries on the whitelist of subaccount shop"


def test_export_into_a_closed_pipe_ends_quietly(cli: Cli, config: Path) -> None:
    for i in range(3):
        cli("blacklist", "add", f"u{i}@example.com", "--reason", "manual", "--global")
    proc = subprocess.Popen([sys.executable, "-m", "relaylab", "blacklist", "export", "--global",
                             "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head -1` once head has its line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and err == ""


def test_whitelist_guardrails(cli: Cli, r: redis.Redis) -> None:
    rc, _, err = cli("whitelist", "add", "gmail.com", "--reason", "our customers", "--subaccount", "shop")
    assert rc == 1 and err.startswith("relaylab: refused: gmail.com is a public mailbox provider's domain")
    rc, _, err = cli("whitelist", "add", "@poczta.onet.pl", "--reason", "x", "--global")
    assert rc == 1 and "cannot be whitelisted" in err
    rc, _, err = cli("whitelist", "add", "ceo@gmail.com", "--reason", "  ", "--subaccount", "shop")
    assert rc == 1 and "written reason" in err
    rc, out, _ = cli("whitelist", "add", "CEO@gmail.com", "--reason", "key customer", "--subaccount", "shop")
    assert rc == 0 and out == "added address ceo@gmail.com to the whitelist of subaccount shop\n"

    cli("blacklist", "add", "bob@example.com", "--reason", "unsubscribe", "--subaccount", "news")
    rc, _, err = cli("whitelist", "add", "bob@example.com", "--reason", "vip", "--global")
    assert rc == 1 and "bob@example.com unsubscribed (subaccount news blacklist" in err
    rc, _, err = cli("whitelist", "add", "bob@example.com", "--reason", "vip", "--subaccount", "news")
    assert rc == 1 and "the recipient's choice wins" in err
    rc, _, _ = cli("whitelist", "add", "bob@example.com", "--reason", "vip", "--subaccount", "shop")
    assert rc == 0  # he unsubscribed from the newsletter, not from order mail
    assert fields(r, "rl:{sub:news}:wl") == set() and fields(r, "rl:{global}:wl") == set()

    rc, _, err = cli("blacklist", "add", "wp.pl", "--reason", "manual", "--subaccount", "shop")
    assert rc == 1 and "--force" in err
    rc, _, _ = cli("blacklist", "add", "wp.pl", "--reason", "manual", "--force", "--subaccount", "shop")
    assert rc == 0


def test_show_reports_whitelist_override(cli: Cli) -> None:
    cli("blacklist", "add", "ann@example.com", "--reason", "hardbounce", "--subaccount", "shop")
    cli("whitelist", "add", "example.com", "--reason", "our own domain", "--global")
    rc, out, _ = cli("blacklist", "show", "ann@example.com", "--subaccount", "shop")
    assert rc == 0
    assert "whitelist: example.com on the global whitelist (our own domain) overrides it" in out
    rc, out, _ = cli("whitelist", "list", "--global")
    assert rc == 0 and "example.com" in out.splitlines()[1] and "our own domain" in out
    rc, out, _ = cli("whitelist", "remove", "example.com", "--global")
    assert rc == 0
    rc, out, _ = cli("blacklist", "show", "ann@example.com", "--subaccount", "shop")
    assert "no entry overrides it" in out
