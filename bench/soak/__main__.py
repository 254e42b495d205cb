"""Soak with faults (issue 13.3): --messages messages (default 10,000) from --sessions
concurrent SMTP sessions (default 50), --per-session messages per session with RSET
between, through two relay hosts sharing a 3-master Redis Cluster with one replica per
master; during the run a Redis master is restarted, a master is failed over to its
replica, a milter worker is SIGKILLed, policyd and the tracker are restarted. Afterwards,
with the queues flushed, every message must be delivered exactly once and correctly
signed (dkimpy) or still queued; lost, duplicated, phantom, unsigned and mis-signed must
all be 0, the limits' counts equal the messages accepted, and the activity log hold one
`injected` and one `ok` event per message. Prints the table (relaylab/devstack/soak.py).

Run as root (Postfix instances), only 127.0.0.1 is used:
    .venv/bin/python bench/soak                       # 10,000 messages, ~2-3 minutes
    .venv/bin/python bench/soak --messages 500 --rate 25   # what the e2e test runs

Exit status 0 when every check passes, 1 otherwise (PROBLEMS listed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relaylab.devstack.soak import FAULTS, SoakParams, run_soak


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--per-session", type=int, default=10)
    p.add_argument("--rate", type=float, default=0.0,
                   help="messages/s offered in total (default 0: as fast as accepted)")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"comma-separated, in order (default {','.join(FAULTS)}; '' for none)")
    p.add_argument("--flush-timeout", type=float, default=180.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--workdir", type=Path)
    a = p.parse_args()
    faults = tuple(f for f in a.faults.split(",") if f)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults {sorted(unknown)}")
    params = SoakParams(messages=a.messages, sessions=a.sessions, per_session=a.per_session,
                        rate=a.rate, faults=faults, flush_timeout=a.flush_timeout,
                        workdir=a.workdir, keep=a.keep,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    report = run_soak(params)
    print(report.table())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
