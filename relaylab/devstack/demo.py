"""`relaylab demo`: the whole relay on loopback, one demo message through it."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

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


def run_demo(workdir: Path, *, keep_running: bool = True) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)  # a fresh instance every time; keys are regenerated
    stack = RelayStack(workdir)
    print(f"starting Redis, sink, milter and Postfix under {workdir} ...", flush=True)
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
  logs:            {stack.milter.log_path}  {pf.log_path}
""", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("\nstopping ...")
        return 0
    finally:
        stack.stop()
