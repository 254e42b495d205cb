"""`relaylab logd` (wired into relaylab/cli.py by register)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from relaylab.cliargs import command, config_arg, config_path, load_or_exit, start_metrics


def register(subparsers: Any) -> None:
    p = command(subparsers, "logd",
                "follow Postfix's log and record what became of every message (delivery "
                "events, bounce classification, automatic suppression)")
    config_arg(p)
    p.add_argument("--log-file", type=Path,
                   help="the log to follow: Postfix's maillog_file or the syslog file with "
                        "Postfix's lines (overrides logd.log_file)")
    p.add_argument("--name", help="checkpoint name, one per mail host (overrides logd.name)")
    p.add_argument("--start-at", choices=["end", "start"],
                   help="without a checkpoint, read from the end (default) or the start of "
                        "the log (overrides logd.start_at)")
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=["debug", "info", "warning", "error"],
                   help="least severe log lines written to stderr (default info)")
    p.set_defaults(func=cmd_logd)


def cmd_logd(args: argparse.Namespace) -> int:
    from logd.service import Logd
    from relaylab.logfmt import setup_logging
    from relaylab.policy.reloader import PolicyHolder

    setup_logging(args.log_level)
    policy = load_or_exit(args, check_keys=False)
    if not start_metrics("logd", policy):
        return 1
    holder = PolicyHolder(config_path(args), policy, check_keys=False)
    settings = policy.logd
    d = Logd(holder, policy.redis_url, args.log_file or settings.log_file,
             args.name or settings.name, start_at=args.start_at or settings.start_at)
    d.install_signals()
    try:
        d.start()
        d.run()
    except KeyboardInterrupt:
        pass
    except Exception:
        import logging

        logging.getLogger("relaylab.logd").exception("logd failed")
        return 1
    finally:
        d.close()
    print("logd stopped", file=sys.stderr)
    return 0
