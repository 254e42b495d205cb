"""`relaylab tracker` (wired into relaylab/cli.py by register)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from relaylab.policy.loader import ConfigError, default_config_path, load_policy


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("tracker", help="run the tracker (open pixel, click redirects, "
                                              "one-click unsubscribe)")
    p.add_argument("--config", type=Path, default=None,
                   help="policy file (default: $RELAYLAB_CONFIG or conf/relaylab.yaml)")
    p.add_argument("--listen", help="HOST:PORT, overrides tracker.listen")
    p.add_argument("--workers", type=int, help="processes sharing the port, overrides tracker.workers")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_tracker)


def cmd_tracker(args: argparse.Namespace) -> int:
    from relaylab.logfmt import setup_logging
    from tracker.server import run

    setup_logging(args.log_level)
    config: Path = args.config if args.config is not None else default_config_path()
    try:  # fail fast with the same report as `relaylab check`
        policy = load_policy(config, check_keys=False)
    except ConfigError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    if not policy.tracker.enabled:
        print(f"error: {config}: tracker: base_url and keys are needed to run the tracker",
              file=sys.stderr)
        return 1
    host, port = None, None
    if args.listen:
        h, sep, p = args.listen.rpartition(":")
        if not sep or not p.isdigit() or not 0 < int(p) < 65536:
            print(f"error: --listen expects HOST:PORT, got {args.listen!r}", file=sys.stderr)
            return 2
        host, port = h.strip("[]") or "127.0.0.1", int(p)
    run(config, host, port, args.workers or policy.tracker.workers)
    return 0
