"""Arguments every `relaylab` service command shares: --config and --listen, and loading
the policy with the same report as `relaylab check`. Used by relaylab/cli.py and by the
services' own CLI modules (policyd/cli.py, tracker/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

from relaylab.policy.loader import ConfigError, default_config_path, load_policy, split_listen
from relaylab.policy.model import Policy

__all__ = ["closed_pipe_exit", "command", "config_arg", "config_path", "listen_arg",
           "load_or_exit", "positive_int", "service_args"]

CLOSED_PIPE_EXIT = 1  # the reader went away (`relaylab ... | head`): not our output's fault


def command(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line `help_text` (in its parent's list) is also the
    description its own --help starts with."""
    p: argparse.ArgumentParser = subparsers.add_parser(name, help=help_text,
                                                       description=help_text)
    return p


def closed_pipe_exit() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null, so that the
    interpreter's final flush does not print a second error, and return the exit status."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return CLOSED_PIPE_EXIT


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="policy file (default: $RELAYLAB_CONFIG, else conf/relaylab.yaml if "
                        "present, else /etc/relaylab/relaylab.yaml)")


def config_path(args: argparse.Namespace) -> Path:
    path: Path = args.config if args.config is not None else default_config_path()
    return path


def load_or_exit(args: argparse.Namespace, *, check_keys: bool = True) -> Policy:
    """The policy, or every problem on stderr and exit status 1."""
    try:
        return load_policy(config_path(args), check_keys=check_keys)
    except ConfigError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"{len(e.problems)} problem(s) in {config_path(args)}", file=sys.stderr)
        raise SystemExit(1) from None


def listen_arg(value: str) -> tuple[str, int]:
    """argparse type of --listen: HOST:PORT, or :PORT for 127.0.0.1."""
    parsed = split_listen("127.0.0.1" + value if value.startswith(":") else value)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"expects HOST:PORT, got {value!r}")
    return parsed


def positive_int(value: str) -> int:
    """argparse type of counts such as --workers."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expects an integer >= 1, got {value!r}")
    return n


def service_args(p: argparse.ArgumentParser, section: str, *, workers: bool = False) -> None:
    """The options every long-running service takes (`relaylab milter|policyd|tracker`);
    `section` is its key in the policy file."""
    config_arg(p)
    p.add_argument("--listen", type=listen_arg, help=f"HOST:PORT, overrides {section}.listen")
    if workers:
        p.add_argument("--workers", type=positive_int,
                       help=f"processes sharing the socket, overrides {section}.workers")
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=["debug", "info", "warning", "error"],
                   help="least severe log lines written to stderr (default info)")


def start_metrics(service: str, policy: Policy, *, multiprocess_mode: bool = False) -> bool:
    """Start `service`'s Prometheus endpoint if the policy enables it (relaylab/metrics.py);
    False, with the error on stderr, if it cannot listen."""
    from relaylab import metrics

    m = policy.metrics
    try:
        metrics.serve(service, m, multiprocess_mode=multiprocess_mode)
    except OSError as e:
        print(f"error: cannot serve metrics on {m.host}:{m.ports[service]} "
              f"(metrics.ports.{service}): {e.strerror or e}", file=sys.stderr)
        return False
    return True
