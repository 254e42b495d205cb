"""`relaylab tracker` (wired into relaylab/cli.py by register)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from relaylab.cliargs import command, config_path, load_or_exit, service_args, start_metrics


def register(subparsers: Any) -> None:
    p = command(subparsers, "tracker",
                "run the tracker (open pixel, click redirects, one-click unsubscribe)")
    service_args(p, "tracker", workers=True)
    p.set_defaults(func=cmd_tracker)


def cmd_tracker(args: argparse.Namespace) -> int:
    from relaylab.logfmt import setup_logging
    from tracker.server import run

    setup_logging(args.log_level)
    # Fail fast with the same report as `relaylab check` (DKIM keys are the milter's).
    policy = load_or_exit(args, check_keys=False)
    config = config_path(args)
    if not policy.tracker.enabled:
        print(f"error: {config}: tracker: base_url and keys are needed to run the tracker",
              file=sys.stderr)
        return 1
    if not start_metrics("tracker", policy, multiprocess_mode=True):
        return 1
    host, port = args.listen or (None, None)
    run(config, host, port, args.workers or policy.tracker.workers)
    return 0
