"""milter.rewrite.markup reads every page the same under Debian 12's own Python.

scripts/install.sh builds /opt/relaylab's venv with /usr/bin/python3, which on Debian 12 is
3.11.2; the tests run on 3.11.7. The re module of 3.11 before 3.11.5 gets possessive
quantifiers wrong when what they repeat can backtrack (gh-106052), and on 3.11.2 the
tokenizer once failed every page with a link ("unterminated markup declaration"). Here the
same pages go through the tokenizer in this process and in a /usr/bin/python3 subprocess
that has nothing but the standard library (-I -S), and the outcomes must be the same, href
spans, quotes, empty hrefs, where the </body> end tag is (the pixel's place) and errors
alike.

The pages: the random pages of test_rewrite_html_tokenizer.py (links and decoys in every
context the tokenizer knows), each also cut short and with a few bytes changed (so that the
error paths run too) and with a </body> put in anywhere, and the HTML parts of the rewrite corpus.
"""

from __future__ import annotations

import email
import email.policy
import json
import random
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

from test_rewrite_html_tokenizer import Page

from milter.rewrite.errors import RewriteError
from milter.rewrite.markup import scan

DEBIAN_PYTHON = Path("/usr/bin/python3")  # what scripts/install.sh builds the venv with
RUNNER = Path(__file__).with_name("markup_runner.py")
CORPUS = Path(__file__).parent / "corpus" / "rewrite"
SEEDS = range(800)
# Bytes that make and break markup, put into pages at random.
DAMAGE = [b"<", b">", b'"', b"'", b"=", b"/", b" ", b"-", b"!", b"<a ", b"<!--", b"-->", b"]]>",
          b"<![CDATA[", b"<svg>", b"</svg>", b"<script>", b"</script>", b"\n", b"href=", b"</body>"]


def pages() -> list[bytes]:
    out: list[bytes] = []
    for seed in SEEDS:
        page = Page(seed).build().encode()
        rng = random.Random(seed)
        out += [page, page[:rng.randrange(len(page) + 1)]]
        damaged = bytearray(page)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(damaged) + 1)
            if rng.random() < 0.5:
                del damaged[at:at + rng.randint(1, 3)]
            else:
                damaged[at:at] = rng.choice(DAMAGE)
        out.append(bytes(damaged))
        at = rng.randrange(len(page) + 1)  # a </body>, real or not depending on where it lands
        out.append(page[:at] + b"</body>" + page[at:])
    for path in sorted(CORPUS.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        for part in message.walk():
            if part.get_content_type() == "text/html":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                out.append(payload)
    return out


def in_process(page: bytes) -> dict[str, object]:
    try:
        found = scan(page)
    except RewriteError as e:
        return {"error": str(e)}
    return {"found": [[s, e, q.decode("latin-1"), notrack] for s, e, q, notrack in found.hrefs],
            "empty": found.empty, "body_end": found.body_end}


def test_the_tokenizer_finds_the_same_hrefs_body_end_and_errors_under_debians_python_3_11_2() -> None:
    assert DEBIAN_PYTHON.exists(), f"{DEBIAN_PYTHON} missing: scripts/bootstrap.sh installs Debian's python3"
    corpus = pages()
    proc = subprocess.run([str(DEBIAN_PYTHON), "-I", "-S", str(RUNNER)],
                          input=json.dumps([p.decode("latin-1") for p in corpus]).encode(),
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    debian = json.loads(proc.stdout)
    assert debian["foreign"] == [], f"the tokenizer needed non-stdlib modules: {debian['foreign']}"
    assert debian["version"] != sys.version  # two different Pythons were compared
    expected = [in_process(p) for p in corpus]
    links = sum(len(r.get("found", ())) for r in expected)  # type: ignore[arg-type]
    errors = sum("error" in r for r in expected)
    assert sum(r.get("body_end") is not None for r in expected) > 50  # pages with a </body>
    assert links > 2000 and errors > 200 and len(expected) - errors > 2000  # both paths ran, a lot
    differ = [i for i, (mine, theirs) in enumerate(zip(expected, debian["results"], strict=True))
              if mine != theirs]
    assert not differ, (
        f"{len(differ)} of {len(corpus)} pages read differently under {debian['version']} than under "
        f"{sys.version}; the first: {corpus[differ[0]][:400]!r}: {expected[differ[0]]} here, "
        f"{debian['results'][differ[0]]} there")
