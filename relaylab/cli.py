"""The `relaylab` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from relaylab.policy.loader import ConfigError, default_config_path, load_policy
from relaylab.policy.model import Policy


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="policy file (default: $RELAYLAB_CONFIG or conf/relaylab.yaml)")


def _config(args: argparse.Namespace) -> Path:
    return args.config if args.config is not None else default_config_path()


def _load_or_exit(args: argparse.Namespace) -> Policy:
    try:
        return load_policy(_config(args))
    except ConfigError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"{len(e.problems)} problem(s) in {_config(args)}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_check(args: argparse.Namespace) -> int:
    policy = _load_or_exit(args)
    m = policy.milter
    print(f"{policy.source}: OK")
    print(f"redis {policy.redis_url}; milter {m.listen_host}:{m.listen_port}; "
          f"unauthenticated={m.unauthenticated.value}; missing_key={m.missing_key.value}")
    print("plans: " + ", ".join(f"{p.name} ({p.hourly_limit}/h, {p.max_sessions} sessions, "
                                f"{p.retention_days}d)" for p in policy.plans))
    for s in policy.subaccounts:
        print(f"subaccount {s.name}: {s.traffic.value}, plan {s.plan.name}, "
              f"logins {', '.join(s.logins)}")
        for d in s.domains:
            keys = ", ".join(f"{k.selector} ({k.algorithm.value})" for k in d.keys)
            print(f"  {d.name}: {keys}")
    return 0


def cmd_milter(args: argparse.Namespace) -> int:
    from milter.server import serve
    from relaylab.logfmt import setup_logging

    setup_logging(args.log_level)
    _load_or_exit(args)  # fail fast with the same report as `relaylab check`
    host, port = None, None
    if args.listen:
        h, _, p = args.listen.rpartition(":")
        host, port = h or "127.0.0.1", int(p)
    asyncio.run(serve(_config(args), host, port))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="relaylab", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate the policy file and print a summary")
    _config_arg(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("milter", help="run the milter (Postfix smtpd_milters)")
    _config_arg(p)
    p.add_argument("--listen", help="HOST:PORT, overrides milter.listen")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_milter)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
