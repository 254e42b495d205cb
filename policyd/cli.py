"""`relaylab policyd` and `relaylab limits show` (wired into relaylab/cli.py by register)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from relaylab import eventloop
from relaylab.cliargs import (
    command,
    config_arg,
    config_path,
    load_or_exit,
    service_args,
    start_metrics,
)
from relaylab.redisclient import sync_client


def register(subparsers: Any) -> None:
    """Add the policyd and limits commands to the `relaylab` parser's subparsers."""
    p = command(subparsers, "policyd", "run the limits policy server (Postfix check_policy_service)")
    service_args(p, "policyd")
    p.set_defaults(func=cmd_policyd)

    limits = command(subparsers, "limits", "sending limits").add_subparsers(
        dest="limits_command", required=True, metavar="COMMAND")
    p = command(limits, "show", "current usage, limits and free session slots")
    config_arg(p)
    p.add_argument("subaccount", nargs="?", help="only this subaccount (default: all)")
    p.set_defaults(func=cmd_limits_show)


def cmd_policyd(args: argparse.Namespace) -> int:
    from policyd.server import serve
    from relaylab.logfmt import setup_logging

    setup_logging(args.log_level)
    # Fail fast with the same report as `relaylab check`; DKIM keys are the milter's.
    policy = load_or_exit(args, check_keys=False)
    if not start_metrics("policyd", policy):
        return 1
    host, port = args.listen or (None, None)
    eventloop.run(serve(config_path(args), host, port))
    return 0


def cmd_limits_show(args: argparse.Namespace) -> int:
    import redis

    from relaylab.limits.report import read_usage

    policy = load_or_exit(args, check_keys=False)
    subs = list(policy.subaccounts)
    if args.subaccount:
        sub = policy.subaccount(args.subaccount)
        if sub is None:
            print(f"relaylab: no subaccount {args.subaccount!r} in {policy.source}", file=sys.stderr)
            return 1
        subs = [sub]
    client = sync_client(policy.redis_url, socket_timeout=5, socket_connect_timeout=5,
                         decode_responses=True)
    now = time.time()
    try:
        reports = [read_usage(client, s, now) for s in subs]
    except redis.RedisError as e:
        print(f"relaylab: Redis at {policy.redis_url}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    header = ("SUBACCOUNT", "PLAN", "LAST 60 MIN", "FREE", "MONTH", "TODAY", "THIS HOUR",
              "SESSIONS", "FREE SLOTS")
    rows = [header]
    for r in reports:
        plan = r.subaccount.plan
        quota = plan.monthly_quota
        rows.append((
            r.subaccount.name, plan.name, f"{r.hour_window}/{plan.hourly_limit}",
            str(r.hourly_free), f"{r.this_month}/{quota}" if quota else str(r.this_month),
            str(r.today), str(r.this_hour), f"{r.sessions}/{plan.max_sessions}",
            str(r.session_slots_free)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in reports:
        if r.hourly_free == 0 and r.frees_at is not None:
            at = time.strftime("%H:%M", time.gmtime(r.frees_at))
            print(f"{r.subaccount.name}: hourly limit reached; capacity frees from {at} UTC")
    return 0
