"""`relaylab bounces` (wired into relaylab/cli.py by register)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from relaylab.cliargs import command, config_path, load_or_exit, service_args, start_metrics


def register(subparsers: Any) -> None:
    p = command(subparsers, "bounces",
                "receive asynchronous bounces (DSNs) and feedback reports (ARF) for the VERP "
                "bounce domain, over LMTP from Postfix")
    service_args(p, "bounces")
    p.set_defaults(func=cmd_bounces)


def cmd_bounces(args: argparse.Namespace) -> int:
    from bounces.service import serve
    from relaylab import eventloop
    from relaylab.logfmt import setup_logging
    from relaylab.policy.reloader import PolicyHolder

    setup_logging(args.log_level)
    policy = load_or_exit(args, check_keys=False)
    if not policy.bounces.enabled:
        print(f"error: {config_path(args)}: bounces: domain and secret are needed to run "
              f"relaylab bounces", file=sys.stderr)
        return 1
    host, port = args.listen or (policy.bounces.listen_host, policy.bounces.listen_port)
    if not start_metrics("bounces", policy):
        return 1
    holder = PolicyHolder(config_path(args), policy, check_keys=False)
    eventloop.run(serve(holder, host, port))
    return 0
