"""Send API benchmark: messages/s accepted through `POST /api/new_sendmail` (a running
`relaylab api serve`, one SMTP session per request into the stack's Postfix with the
milter and policyd), next to the same messages submitted straight over SMTP, in the same
run.

  reference  smtplib, logged in as the same api_login, one session per --batch messages,
             --clients sessions at once (as the API opens them), one MAIL/RCPT/DATA per
             message: the messages the API would build (api/compose.py, built in
             advance, outside the timing), so this is what Postfix, the milter (signing)
             and policyd cost per message on this box
  relaylab   an EmailLabs-style client POSTing form-encoded requests of --batch
             recipients each (HTTP Basic, PHP-bracket bodies), --clients at once: parse,
             validate, build each message, inject it, answer with every message id

Rate = messages accepted (250 at DATA) / wall time of the phase. Rounds alternate
reference, relaylab, ...; medians are reported with the ratio relaylab / reference.
Checks: every message accepted, every id in the reply, the sink got them all.

    python bench/send [--messages 1000] [--batch 200] [--clients 2] [--rounds 3]

Exit status: 0 when every check held (the ratio is a figure, not a verdict); 1 a check
failed; 2 the setup failed.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import json
import shutil
import smtplib
import statistics
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sendutil import php_pairs  # noqa: E402

from api.auth import hash_secret  # noqa: E402
from api.compose import Recipient, build_message, parse_send  # noqa: E402
from relaylab.devstack.api import ApiProcess  # noqa: E402
from relaylab.devstack.ports import free_port  # noqa: E402
from relaylab.devstack.stack import DEMO_ACCOUNTS, RelayStack  # noqa: E402
from relaylab.devstack.workdir import make_workdir  # noqa: E402

SUB = DEMO_ACCOUNTS[0].name
API_LOGIN, API_PASSWORD = "api-bench@relay.test", "api-bench-secret"
APP_KEY, APP_SECRET = "bench-app-key-0001", "bench-app-secret"
HTML = "<html><body>" + "<p>Your order has shipped. Track it in your account.</p>" * 60 + \
    "</body></html>"  # ~3.5 KB, like a receipt


def params(rcpts: list[str]) -> dict[str, Any]:
    return {"smtp_account": SUB, "from": "orders@shop.example.com", "from_name": "Shop",
            "subject": "Your order has shipped", "html": HTML, "text": "Your order has shipped.",
            "tags": ["bench"], "to": {a: "" for a in rcpts}}


def post(port: int, body: bytes) -> dict[str, Any]:
    token = base64.b64encode(f"{APP_KEY}:{APP_SECRET}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/api/new_sendmail", body=body, headers={
            "Authorization": f"Basic {token}",
            "Content-Type": "application/x-www-form-urlencoded"})
        out: dict[str, Any] = json.loads(conn.getresponse().read())
        return out
    finally:
        conn.close()


def session(port: int, messages: list[tuple[str, bytes]]) -> int:
    accepted = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.login(API_LOGIN, API_PASSWORD)
        for rcpt, msg in messages:
            s.sendmail("orders@shop.example.com", [rcpt], msg)
            accepted += 1
    return accepted


def reference(port: int, messages: list[tuple[str, bytes]], batch: int, clients: int) -> int:
    """The same sessions as the API opens: one per --batch messages, --clients at once."""
    chunks = [messages[i:i + batch] for i in range(0, len(messages), batch)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(lambda c: session(port, c), chunks))


def relaylab(port: int, bodies: list[bytes], clients: int) -> int:
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(lambda b: post(port, b), bodies))
    sent = 0
    for reply in replies:
        for item in reply.get("data") or []:
            ((_, value),) = item.items()
            sent += isinstance(value, str) and len(value) == 32
    return sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=200, help="recipients per API request")
    ap.add_argument("--clients", type=int, default=2, help="API requests at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    work = make_workdir("relaylab-bench-send-")
    problems: list[str] = []
    ref_rates: list[float] = []
    our_rates: list[float] = []
    try:
        st = RelayStack(work, extra_sasl_users={API_LOGIN: API_PASSWORD})
        try:
            st.start()
        except Exception as e:
            print(f"the stack did not start: {e}")
            return 2
        try:
            (work / "api.password").write_text(API_PASSWORD + "\n")
            policy = st.policy_dict()
            policy["plans"] = {"bench": {"hourly_limit": 10_000_000}}
            policy["subaccounts"][SUB].update(plan="bench", api_login={
                "login": API_LOGIN, "password_file": str(work / "api.password")})
            policy["api"] = {"submit": f"127.0.0.1:{st.postfix.submit_port}", "clients": {
                "bench": {"key": APP_KEY, "secret_hash": hash_secret(APP_SECRET, n=2 ** 10),
                          "subaccounts": [SUB]}}}
            st.write_policy(policy)
            time.sleep(2.5)  # the services pick up the new policy (additions apply by themselves)
            rcpts = [f"user{i}@example.net" for i in range(args.messages)]
            req = parse_send(params(rcpts[:1]))
            prebuilt = [(r, build_message(req, Recipient(r), req.content,
                                          relaylab_id=f"{i:032x}", id_header="X-Relaylab-Message-ID"))
                        for i, r in enumerate(rcpts)]
            bodies = [urllib.parse.urlencode(php_pairs(params(rcpts[i:i + args.batch]))).encode()
                      for i in range(0, len(rcpts), args.batch)]
            print(f"{args.messages} messages of {len(prebuilt[0][1]):,} bytes; API: "
                  f"{len(bodies)} requests of {args.batch} recipients, {args.clients} at once")
            with ApiProcess(st.config, work / "api.log", free_port()) as api:
                for rnd in range(1, args.rounds + 1):
                    st.sink.clear()
                    t0 = time.monotonic()
                    n = reference(st.postfix.submit_port, prebuilt, args.batch, args.clients)
                    rate = n / (time.monotonic() - t0)
                    ref_rates.append(rate)
                    got = len(st.sink.wait_for(args.messages, 120))
                    if n != args.messages or got != args.messages:
                        problems.append(f"reference round {rnd}: {n} accepted, {got} arrived")
                    print(f"round {rnd} reference (smtplib)  {rate:7.1f} messages/s")

                    st.sink.clear()
                    t0 = time.monotonic()
                    n = relaylab(api.port, bodies, args.clients)
                    rate = n / (time.monotonic() - t0)
                    our_rates.append(rate)
                    got = len(st.sink.wait_for(args.messages, 120))
                    if n != args.messages or got != args.messages:
                        problems.append(f"relaylab round {rnd}: {n} ids in the replies, "
                                        f"{got} arrived")
                    print(f"round {rnd} relaylab (HTTP API) {rate:7.1f} messages/s")
                if "level=error" in api.log_text():
                    problems.append(f"errors in {work / 'api.log'}")
        finally:
            st.stop()
    finally:
        if not args.keep and not problems:
            shutil.rmtree(work, ignore_errors=True)
    ref, ours = statistics.median(ref_rates), statistics.median(our_rates)
    print(f"\nmedian reference (smtplib, prebuilt messages): {ref:7.1f} messages/s")
    print(f"median relaylab new_sendmail:                 {ours:7.1f} messages/s "
          f"({ours / ref:.2f} of the reference)")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
