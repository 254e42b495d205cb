"""`relaylab events` and `relaylab stats`: the activity log and the statistics.

Exit status: 0 done (also when nothing matched); 1 bad policy, unknown subaccount or
Redis unreachable; 2 a wrong command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from relaylab.cliargs import command, config_arg, load_or_exit
from relaylab.events.query import (
    STAT_COLUMNS,
    Filter,
    detail,
    iter_events,
    not_opened,
    parse_when,
    stats_rows,
)
from relaylab.policy.model import Policy
from relaylab.redisclient import sync_client

__all__ = ["register"]

EVENT_TYPES = ("injected", "dropped", "dropped_shadow", "ok", "deferred", "softbounce",
               "hardbounce", "spambounce", "expired", "feedback", "open", "click", "unsubscribe")


def register(subparsers: Any) -> None:
    p = command(subparsers, "events",
                "the activity log: what happened to messages, per recipient (injected, "
                "delivered, bounced, opened, ...)")
    config_arg(p)
    p.add_argument("--subaccount", help="only this subaccount (default: all of the policy)")
    p.add_argument("--message-id", help="Relaylab message id (X-Relaylab-Message-ID)")
    p.add_argument("--queue-id", help="Postfix queue id")
    p.add_argument("--recipient", help="recipient address (case-insensitive)")
    p.add_argument("--type", action="append", default=[], metavar="TYPE",
                   help=f"event type, repeatable or comma-separated: {', '.join(EVENT_TYPES)}")
    p.add_argument("--tag", help="only events of messages with this X-Relaylab-Tags tag")
    p.add_argument("--since", help="from this time: YYYY-MM-DD[THH:MM] UTC, or 30m/2h/7d ago "
                                   "(default: as far as retention keeps)")
    p.add_argument("--until", help="up to this time (same forms; default now)")
    p.add_argument("--limit", type=int, default=100,
                   help="at most this many events, oldest first (default 100; 0: all)")
    p.add_argument("--not-opened", action="store_true",
                   help="list recipients of --message-id or --tag delivered (ok) but never "
                        "opened")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=cmd_events)

    p = command(subparsers, "stats",
                "statistics per subaccount and hour or day: injected, delivered, deferred, "
                "bounces, dropped, opens, clicks, unsubscribes")
    config_arg(p)
    p.add_argument("--subaccount", help="only this subaccount (default: all of the policy)")
    p.add_argument("--hourly", action="store_true", help="per hour (default: per day)")
    p.add_argument("--since", default=None,
                   help="from: YYYY-MM-DD[THH:MM] UTC or 30m/2h/7d ago (default 7d, or 24h "
                        "with --hourly)")
    p.add_argument("--until", help="up to (default now)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=cmd_stats)


def _subaccounts(policy: Policy, name: str | None) -> list[str]:
    if name is None:
        return [s.name for s in policy.subaccounts]
    if policy.subaccount(name) is None:
        raise _Fail(f"unknown subaccount {name!r} (configured: "
                    f"{', '.join(s.name for s in policy.subaccounts)})")
    return [name]


class _Fail(Exception):
    """A reason to exit 1, for the operator."""


def _fail(message: str) -> int:
    print(f"relaylab: {message}", file=sys.stderr)
    return 1


def cmd_events(args: argparse.Namespace) -> int:
    try:
        return _events(args)
    except _Fail as e:
        return _fail(str(e))


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        return _stats(args)
    except _Fail as e:
        return _fail(str(e))


def _times(args: argparse.Namespace, default_since: str | None) -> tuple[float | None, float]:
    now = time.time()
    since_text: str | None = args.since or default_since
    try:
        since = parse_when(since_text, now) if since_text else None
        until = parse_when(args.until, now) if args.until else now
    except ValueError as e:
        raise _Fail(str(e)) from None
    return since, until


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _client(policy: Policy) -> redis.Redis:
    return sync_client(policy.redis_url, socket_connect_timeout=5, socket_timeout=60)


def _events(args: argparse.Namespace) -> int:
    policy = load_or_exit(args, check_keys=False)
    subs = _subaccounts(policy, args.subaccount)
    types = frozenset(t.strip() for arg in args.type for t in arg.split(",") if t.strip())
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        return _fail(f"unknown event type(s): {', '.join(unknown)}")
    if args.not_opened and not (args.message_id or args.tag):
        return _fail("--not-opened needs --message-id or --tag")
    since, until = _times(args, None)
    r = _client(policy)
    try:
        if args.not_opened:
            return _not_opened(args, r, subs, since, until)
        flt = Filter(args.message_id, args.queue_id, args.recipient, types, args.tag)
        shown = 0
        if not args.json:
            print(f"{'TIME':20}  {'SUBACCOUNT':18}  {'TYPE':11}  {'QUEUE ID':12}  "
                  f"{'MESSAGE ID':32}  {'RECIPIENT':30}  DETAIL")
        for sub in subs:
            for at, f in iter_events(r, sub, since, until):
                if not flt.matches(f):
                    continue
                if args.json:
                    print(json.dumps({"time": _iso(at), "subaccount": sub, **f},
                                     ensure_ascii=False))
                else:
                    print(f"{_iso(at):20}  {sub:18}  {f.get('type', ''):11}  "
                          f"{f.get('queue_id', ''):12}  {f.get('message_id', ''):32}  "
                          f"{f.get('recipient', ''):30}  {detail(f)}")
                shown += 1
                if args.limit and shown >= args.limit:
                    return 0
    except redis.RedisError as e:
        return _fail(f"Redis at {policy.redis_url}: {e}")
    finally:
        r.close()
    return 0


def _not_opened(args: argparse.Namespace, r: redis.Redis, subs: list[str],
                since: float | None, until: float) -> int:
    for sub in subs:
        rows = not_opened(iter_events(r, sub, since, until), message_id=args.message_id,
                          tag=args.tag)
        for at, mid, rcpt in rows:
            if args.json:
                print(json.dumps({"delivered": _iso(at), "subaccount": sub, "message_id": mid,
                                  "recipient": rcpt}))
            else:
                print(f"{_iso(at)}  {sub}  {mid}  {rcpt}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    policy = load_or_exit(args, check_keys=False)
    subs = _subaccounts(policy, args.subaccount)
    since, until = _times(args, "24h" if args.hourly else "7d")
    assert since is not None
    r = _client(policy)
    columns = [c for c, _ in STAT_COLUMNS]
    try:
        if not args.json:
            head = "HOUR" if args.hourly else "DAY"
            print(f"{'SUBACCOUNT':18}  {head:13}  " + "  ".join(f"{c:>{max(len(c), 6)}}"
                                                            for c in columns))
        for sub in subs:
            for row in stats_rows(r, sub, since, until, args.hourly):
                label = time.strftime("%Y-%m-%d %H" if args.hourly else "%Y-%m-%d",
                                      time.gmtime(row["start"]))
                if args.json:
                    print(json.dumps({"subaccount": sub, ("hour" if args.hourly else "day"): label,
                                      **{c: row[c] for c in columns}}))
                else:
                    print(f"{sub:18}  {label:13}  " + "  ".join(
                        f"{row[c]:>{max(len(c), 6)}}" for c in columns))
    except redis.RedisError as e:
        return _fail(f"Redis at {policy.redis_url}: {e}")
    finally:
        r.close()
    return 0
