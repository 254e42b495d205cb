"""`relaylab webhooks ...` (wired into relaylab/cli.py by register)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
import time
from typing import Any

from relaylab.cliargs import command, config_arg, config_path, load_or_exit, start_metrics
from relaylab.policy.model import Policy, Subaccount, Webhook

__all__ = ["parse_time", "register"]


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it names an offset)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected unix seconds or an ISO 8601 time such as 2026-12-05T08:00:00Z, "
            f"got {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def _log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=["debug", "info", "warning", "error"],
                   help="least severe log lines written to stderr (default info)")


def register(subparsers: Any) -> None:
    wh = command(subparsers, "webhooks", "event webhooks: signed JSON batches of each "
                 "subaccount's events, with retries").add_subparsers(
        dest="webhooks_command", required=True, metavar="COMMAND")

    p = command(wh, "serve", "send every subaccount's new events to its webhook (the service)")
    config_arg(p)
    _log_level(p)
    p.set_defaults(func=cmd_serve)

    p = command(wh, "test", "send one test event to a subaccount's webhook and show the answer")
    config_arg(p)
    p.add_argument("--subaccount", required=True, help="the subaccount (its webhook in the policy)")
    p.add_argument("--backup", action="store_true", help="send it to the backup URL")
    p.set_defaults(func=cmd_test)

    p = command(wh, "replay", "send a subaccount's events of a time range again (queued for "
                "the running service, with the usual retries)")
    config_arg(p)
    p.add_argument("--subaccount", required=True, help="the subaccount (its webhook in the policy)")
    p.add_argument("--from", dest="start", required=True, type=parse_time,
                   help="unix seconds or ISO 8601 (UTC unless an offset is given)")
    p.add_argument("--to", dest="end", required=True, type=parse_time, help="as --from, inclusive")
    p.add_argument("--types", help="comma-separated event types (default: the webhook's)")
    p.set_defaults(func=cmd_replay)

    p = command(wh, "dead", "list a subaccount's dead letters (batches whose retries ran out)")
    config_arg(p)
    p.add_argument("--subaccount", required=True, help="the subaccount (its webhook in the policy)")
    p.add_argument("--requeue", action="store_true",
                   help="queue them again for the running service (schedule from the start)")
    p.add_argument("--body", action="store_true", help="print each batch's JSON too")
    p.set_defaults(func=cmd_dead)

    p = command(wh, "status", "batches waiting, dead letters and the recent delivery attempts "
                "per subaccount")
    config_arg(p)
    p.add_argument("--attempts", type=int, default=5, metavar="N",
                   help="show each subaccount's N most recent delivery attempts, newest first "
                   "(default 5, at most 50; 0: none)")
    p.set_defaults(func=cmd_status)

    p = command(wh, "secret", "print a new signing secret (whsec_...) for the policy")
    p.set_defaults(func=cmd_secret)


def _webhook_of(policy: Policy, args: argparse.Namespace) -> tuple[Subaccount, Webhook]:
    sub = policy.subaccount(args.subaccount)
    if sub is None:
        print(f"error: no subaccount {args.subaccount!r} in {policy.source}", file=sys.stderr)
        raise SystemExit(1)
    if sub.webhook is None:
        print(f"error: subaccount {sub.name} has no webhook in {policy.source}", file=sys.stderr)
        raise SystemExit(1)
    return sub, sub.webhook


def cmd_secret(args: argparse.Namespace) -> int:
    from webhooks.sign import new_secret

    print(new_secret())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from relaylab.eventloop import run
    from relaylab.logfmt import setup_logging

    setup_logging(args.log_level)
    policy = load_or_exit(args, check_keys=False)
    if not start_metrics("webhooks", policy):
        return 1
    run(_serve(args, policy))
    print("webhooks stopped", file=sys.stderr)
    return 0


async def _serve(args: argparse.Namespace, policy: Policy) -> None:
    import aiohttp

    from relaylab.policy.reloader import PolicyHolder
    from webhooks.service import WebhookService
    from webhooks.store import Store, client

    holder = PolicyHolder(config_path(args), policy, check_keys=False)
    r = client(policy.redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    holder.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
            await WebhookService(holder, Store(r), session).run(stop)
    finally:
        await holder.stop()
        await r.close()


def cmd_test(args: argparse.Namespace) -> int:
    from relaylab.eventloop import run

    policy = load_or_exit(args, check_keys=False)
    sub, webhook = _webhook_of(policy, args)
    if args.backup and webhook.backup_url is None:
        print(f"error: subaccount {sub.name} has no backup_url", file=sys.stderr)
        return 1
    url = webhook.backup_url if args.backup and webhook.backup_url else webhook.url
    return run(_test(sub.name, webhook, url))


async def _test(sub: str, webhook: Webhook, url: str) -> int:
    import aiohttp

    from webhooks.decide import encode, new_batch_id, test_event
    from webhooks.sender import post

    body = encode(test_event(sub, time.time()))
    msg_id = new_batch_id()
    async with aiohttp.ClientSession() as session:
        answer = await post(session, webhook, url, msg_id, body, int(time.time()))
    print(f"POST {url}")
    print(f"webhook-id: {msg_id}")
    print(f"body: {body.decode()}")
    ms = answer.duration * 1000
    if answer.status is None:
        print(f"-> no answer after {ms:.0f} ms: {answer.error}")
        return 1
    print(f"-> HTTP {answer.status} in {ms:.0f} ms ({'ok' if answer.ok else 'a failure'})")
    for k, v in answer.headers:
        print(f"   {k}: {v}")
    if answer.body:
        print(answer.body.decode("utf-8", "replace"))
    return 0 if answer.ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from relaylab.eventloop import run
    from relaylab.policy.model import WEBHOOK_EVENT_TYPES

    policy = load_or_exit(args, check_keys=False)
    sub, webhook = _webhook_of(policy, args)
    types = webhook.events
    if args.types:
        types = frozenset(t.strip() for t in args.types.split(",") if t.strip())
        bad = sorted(types - set(WEBHOOK_EVENT_TYPES))
        if bad:
            print(f"error: unknown event types: {', '.join(bad)}", file=sys.stderr)
            return 1
    if args.end < args.start:
        print("error: --to is before --from", file=sys.stderr)
        return 1
    events, batches = run(_replay(policy.redis_url, sub.name, webhook, types,
                                  int(args.start * 1000), int(args.end * 1000)))
    print(f"queued {events} events of {sub.name} in {batches} batches for the webhooks "
          f"service ({webhook.url})")
    return 0


async def _replay(redis_url: str, sub: str, webhook: Webhook, types: frozenset[str],
                  start_ms: int, end_ms: int) -> tuple[int, int]:
    from webhooks.decide import cut_batches
    from webhooks.store import Store, client

    r = client(redis_url)
    store = Store(r)
    events = batches = 0
    start = str(start_ms)
    try:
        while True:
            entries = await store.read_range(sub, start, f"{end_ms}-18446744073709551615", 5000)
            if not entries:
                break
            cut = cut_batches(sub, entries, types, webhook.batch_size)
            if cut:
                await store.enqueue(sub, cut, expected="*", cursor="",
                                    now_ms=int(time.time() * 1000), kind="replay")
            events += sum(b.count for b in cut)
            batches += len(cut)
            start = "(" + entries[-1][0]
    finally:
        await r.close()
    return events, batches


def cmd_dead(args: argparse.Namespace) -> int:
    from relaylab.eventloop import run

    policy = load_or_exit(args, check_keys=False)
    sub, _ = _webhook_of(policy, args)
    return run(_dead(policy.redis_url, sub.name, args.requeue, args.body))


async def _dead(redis_url: str, sub: str, requeue: bool, body: bool) -> int:
    from webhooks.decide import stream_ms
    from webhooks.store import Store, client

    r = client(redis_url)
    store = Store(r)
    try:
        letters = await store.dead_letters(sub)
        for d in letters:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stream_ms(d.entry) / 1000))
            print(f"{when} batch={d.batch} events={d.count} tries={d.tries} url={d.url} "
                  f"error={d.error!r}")
            if body:
                print(d.body.decode("utf-8", "replace"))
        if requeue:
            now_ms = int(time.time() * 1000)
            n = sum([await store.requeue(sub, d, now_ms) for d in letters])
            print(f"requeued {n} batches of {sub}")
        else:
            print(f"{len(letters)} dead letters in {sub}")
    finally:
        await r.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from relaylab.eventloop import run

    policy = load_or_exit(args, check_keys=False)
    return run(_status(policy, max(0, args.attempts)))


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


async def _status(policy: Policy, attempts: int) -> int:
    from webhooks.store import Store, client

    r = client(policy.redis_url)
    store = Store(r)
    try:
        for sub in policy.subaccounts:
            if sub.webhook is None:
                continue
            waiting, first = await store.pending(sub.name)
            dead = len(await store.dead_letters(sub.name))
            due = "-" if first is None else \
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first))
            print(f"{sub.name}: url={sub.webhook.url} batches_waiting={waiting} "
                  f"next_due={due} dead_letters={dead}")
            for a in await store.attempts(sub.name, attempts) if attempts else ():
                print(f"  {_stamp(a.at)} batch={a.batch} events={a.events} target={a.target} "
                      f"url={a.url} try={a.attempt} result={a.result!r} "
                      f"duration_ms={a.duration_ms:g} outcome={a.outcome}")
    finally:
        await r.close()
    return 0
