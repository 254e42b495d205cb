"""`python -m policyd [policyd|limits show] ...`: the same commands as `relaylab policyd` and
`relaylab limits show`, usable before (or without) the `relaylab` entry point."""

from __future__ import annotations

import argparse
import sys

from policyd.cli import register


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m policyd")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
