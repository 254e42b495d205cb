"""`relaylab demo`: the whole relay on loopback, one demo message through it."""

from __future__ import annotations

import html
import re
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

import redis

from .smtp import SMTPSession
from .stack import RelayStack

DEMO_MESSAGE = (
    "From: Example Shop <orders@{domain}>\r\n"
    "To: Bob <bob@example.net>\r\n"
    "Subject: Your order #1042 has shipped\r\n"
    "Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
    "Message-ID: <order-1042@{domain}>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Hello Bob,\r\n\r\nyour order #1042 is on its way.\r\n"
)


NEWSLETTER = (
    "From: Example Shop News <news@{domain}>\r\n"
    "To: Bob <bob@example.net>\r\n"
    "Subject: The November sale\r\n"
    "Date: Fri, 27 Nov 2026 10:05:00 +0000\r\n"
    "Message-ID: <news-2026-11@{domain}>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "\r\n"
    "<html><body><p>Hello Bob, the sale is on.</p>\r\n"
    "<p><a href=\"https://shop.example.com/sale?cat=shoes&amp;size=42\">Shoes</a> \r\n"
    "<a href=\"mailto:help@shop.example.com\">Questions?</a></p>\r\n"
    "</body></html>\r\n"
)


def _follow(url: str) -> str:
    """One request without following the redirect: "STATUS -> Location"."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=5) as resp:
            return str(resp.status)
    except urllib.error.HTTPError as e:
        return f"{e.code} -> {e.headers.get('Location')}"


def _tracking_demo(stack: RelayStack) -> bool:
    """A marketing message: tracked links, the pixel, List-Unsubscribe; follow one click."""
    news = stack.accounts[1]
    stack.sink.clear()
    with SMTPSession(stack.postfix.submit_port) as s:
        if s.auth_plain(news.login, news.password).code != 235:
            return False
        s.send(f"news@{news.domain}", ["bob@example.net"],
               NEWSLETTER.format(domain=news.domain).encode())
    (path,) = stack.sink.wait_for(1, 30)
    delivered = path.read_bytes()
    head, _, body = delivered.partition(b"\r\n\r\n")
    print(f"\n--- a newsletter as {news.login}: headers added, links tracked ---")
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if line.lower().startswith(("list-unsubscribe", "precedence", "x-relaylab")):
            print(line)
    print(body.decode("utf-8", "replace").replace("\r\n", "\n"))
    ok = all(stack.verify_dkim(delivered))
    print(f"DKIM over the rewritten message: {'pass' if ok else 'FAIL'}")
    clicks = re.findall(r'href="([^"]+/c/[^"]+)"', body.decode("utf-8", "replace"))
    if not clicks:
        return False
    key = f"rl:{{sub:{news.name}}}:events"
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        # relaylab logd turns Postfix's delivery line into the ok event within a fraction
        # of a second; click only once it is in, so the log reads injected, ok, click.
        logged, events = _wait_for_events(r, key, {"injected", "ok"})
        print(f"\nclick on the first link: {_follow(html.unescape(clicks[0]))}")
        if logged:
            logged, events = _wait_for_events(r, key, {"click"})
    finally:
        r.close()
    print(f"\nthe activity log ({key}: injected by the milter, ok by relaylab logd from"
          " Postfix's log, click by the tracker):")
    for _, fields in events:
        print("event:", " ".join(f"{k}={v}" for k, v in fields.items()))
    return ok and logged


def _wait_for_events(r: redis.Redis, key: str, wanted: set[str], timeout: float = 15.0
                     ) -> tuple[bool, list[tuple[str, dict[str, str]]]]:
    """(every wanted type is in, the stream's entries), waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        events = cast(list[tuple[str, dict[str, str]]], r.xrange(key))
        if wanted <= {fields.get("type") for _, fields in events}:
            return True, events
        if time.monotonic() > deadline:
            return False, events
        time.sleep(0.1)


# Written into every workdir the demo creates: only such a directory is ever emptied.
WORKDIR_MARKER = ".relaylab-demo-workdir"


class WorkdirRefused(Exception):
    pass


def prepare_workdir(workdir: Path) -> None:
    """A fresh, empty workdir (keys are regenerated every run). An existing directory is
    emptied only if the demo made it (it holds WORKDIR_MARKER) or it is empty: anything
    else is someone's data."""
    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise WorkdirRefused(f"{workdir} exists and is not a directory")
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / WORKDIR_MARKER).is_file():
            raise WorkdirRefused(
                f"{workdir} is not empty and was not made by `relaylab demo`: refusing to "
                "delete it (pick another --workdir)")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).write_text("made by `relaylab demo`; emptied on its next run\n")


def run_demo(workdir: Path, *, keep_running: bool = True) -> int:
    try:
        prepare_workdir(workdir)
    except (WorkdirRefused, OSError) as e:
        print(f"relaylab: {e}", file=sys.stderr)
        return 1
    stack = RelayStack(workdir, logd_name="demo")
    print(f"starting Redis, sink, milter, policyd, tracker, logd and Postfix under {workdir} ...",
          flush=True)
    stack.start()
    try:
        account = stack.accounts[0]
        with SMTPSession(stack.postfix.submit_port) as s:
            auth = s.auth_plain(account.login, account.password)
            if auth.code != 235:
                print(f"AUTH failed: {auth}")
                return 1
            t = s.send(f"orders@{account.domain}", ["bob@example.net"],
                       DEMO_MESSAGE.format(domain=account.domain).encode())
        print(f"\nsubmitted as {account.login}: {t.last}")
        (path,) = stack.sink.wait_for(1, 30)
        delivered = path.read_bytes()
        print(f"\n--- delivered by Postfix to the sink ({path}) ---")
        print(delivered.decode("utf-8", "replace").replace("\r\n", "\n"))
        results = stack.verify_dkim(delivered)
        print("--- DKIM verification (dkimpy, against the generated public keys) ---")
        for i, ok in enumerate(results):
            print(f"signature {i + 1}: {'pass' if ok else 'FAIL'}")
        line = stack.milter.wait_for_log(f"queue_id={t.queue_id}")
        print(f"\n--- milter log line ---\n{line}")
        if not results or not all(results):
            return 1
        if not _tracking_demo(stack):
            return 1
        if not keep_running:
            return 0
        pf = stack.postfix
        print(f"""
The relay stays up until Ctrl-C. Try it:
  swaks --server 127.0.0.1:{pf.submit_port} --auth PLAIN \\
        --auth-user {stack.accounts[1].login} --auth-password {stack.accounts[1].password} \\
        --from news@{stack.accounts[1].domain} --to bob@example.net \\
        --header 'From: News <news@{stack.accounts[1].domain}>'
  delivered mail:  {stack.sink.maildir}/new/
  policy:          {stack.config}   (edit it: the milter reloads within a second)
  tracker:         {stack.tracker.base_url}   (links in delivered marketing mail point here)
  logs:            {stack.milter.log_path}  {stack.tracker.log_path}  {pf.log_path}
  activity log:    .venv/bin/relaylab events --config {stack.config}
""", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("\nstopping ...")
        return 0
    finally:
        stack.stop()
