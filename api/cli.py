"""`relaylab api serve` and `relaylab api keygen` (wired into relaylab/cli.py by register)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from relaylab.cliargs import command, config_path, load_or_exit, service_args, start_metrics

__all__ = ["register"]


def register(subparsers: Any) -> None:
    api = command(subparsers, "api", "the HTTP API compatible with EmailLabs' v1").add_subparsers(
        dest="api_command", required=True, metavar="COMMAND")
    p = command(api, "serve", "run the HTTP API (the relaylab-api service)")
    service_args(p, "api", workers=True)
    p.set_defaults(func=cmd_serve)
    p = command(api, "keygen", "print a new app key and secret, and the policy YAML to paste "
                "(only a hash of the secret goes into the policy)")
    p.add_argument("--name", default="app", help="the client's name in api.clients (default app)")
    p.add_argument("--subaccount", action="append", default=[], metavar="NAME",
                   help="a subaccount the client may see (repeat for several)")
    p.add_argument("--operator", action="store_true", help="the client sees every subaccount")
    p.set_defaults(func=cmd_keygen)


def cmd_serve(args: argparse.Namespace) -> int:
    from api.server import run
    from relaylab.logfmt import setup_logging

    setup_logging(args.log_level)
    policy = load_or_exit(args, check_keys=False)
    if not start_metrics("api", policy, multiprocess_mode=True):
        return 1
    host, port = args.listen or (None, None)
    run(config_path(args), host, port, args.workers or policy.api.workers)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from api.auth import hash_secret, new_credentials

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", args.name):
        print(f"error: --name: 1-64 of A-Z a-z 0-9 . _ - , got {args.name!r}")
        return 2
    if not args.subaccount and not args.operator:
        print("error: give --subaccount NAME (repeatable) or --operator")
        return 2
    key, secret = new_credentials()
    print(f"app key: {key}")
    print(f"secret:  {secret}")
    print("(the secret is shown once: only its hash goes into the policy)")
    print()
    print("# paste under api: clients: in the policy, then `relaylab reload`")
    print(f"    {args.name}:")
    print(f"      key: {key}")
    print(f"      secret_hash: \"{hash_secret(secret)}\"")
    if args.subaccount:
        print(f"      subaccounts: [{', '.join(args.subaccount)}]")
    if args.operator:
        print("      operator: true")
    return 0
