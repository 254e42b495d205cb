"""`relaylab blacklist ...` and `relaylab whitelist ...`: operators manage suppression lists.

Exit status: 0 done; 1 refused by a guardrail, not found, or invalid import lines;
2 the command could not run (policy file, unknown subaccount, Redis unreachable).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import attrs
import redis

from relaylab.cliargs import closed_pipe_exit, config_arg, config_path
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import Policy
from relaylab.redisclient import sync_client
from relaylab.suppression.csvio import (
    CsvFormatError,
    ParseError,
    format_time,
    parse_time,
    read_entries,
    write_csv,
    write_jsonl,
)
from relaylab.suppression.model import GLOBAL, CorruptEntry, Entry, Kind, ListKind, Reason, Scope, Source
from relaylab.suppression.normalize import InvalidAddress, LocalPartMode, parse_target
from relaylab.suppression.store import (
    Refused,
    SyncSuppressionStore,
    check_blacklist_entry,
)

__all__ = ["register"]

# Until the policy has a setting for it, every tool compares local parts the same way.
LOCAL_PART: LocalPartMode = "lowercase"
MAX_REPORTED = 1_000  # invalid import lines listed (all are counted)

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # argparse's private type


class _Fail(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class _Ctx:
    policy: Policy
    scope: Scope
    store: SyncSuppressionStore

    def where(self, which: ListKind) -> str:
        return f"the global {which.label}" if self.scope is GLOBAL else \
            f"the {which.label} of subaccount {self.scope}"


# --- argument parsing -----------------------------------------------------------------


def register(subparsers: Subparsers) -> None:
    """Add the `blacklist` and `whitelist` commands to the `relaylab` parser."""
    text = "suppressed recipients: never mailed (bounced, complained, unsubscribed)"
    bl = subparsers.add_parser("blacklist", help=text, description=text).add_subparsers(
        dest="blacklist_command", required=True)

    p = _leaf(bl, "add", "blacklist an address or a whole domain")
    p.add_argument("target", metavar="ADDRESS_OR_DOMAIN",
                   help="user@example.com, example.com or @example.com")
    p.add_argument("--reason", required=True, choices=[r.value for r in Reason],
                   help="why the recipient is suppressed")
    p.add_argument("--comment", default="", help="free text stored with the entry")
    p.add_argument("--expires", metavar="DAYS|DATE",
                   help="the entry stops applying after DAYS days, or at DATE (2027-01-31 UTC, or ISO 8601)")
    p.add_argument("--force", action="store_true",
                   help="allow blacklisting a public mailbox provider's whole domain")
    p.set_defaults(func=_command(cmd_blacklist_add))

    p = _leaf(bl, "remove", "remove an address or domain from the blacklist")
    p.add_argument("target", metavar="ADDRESS_OR_DOMAIN", help="the entry to remove")
    p.set_defaults(func=_command(_cmd_remove(ListKind.BLACKLIST)))

    p = _leaf(bl, "show", "show an entry and whether a whitelist overrides it")
    p.add_argument("target", metavar="ADDRESS_OR_DOMAIN", help="the entry to show")
    p.set_defaults(func=_command(cmd_blacklist_show))

    p = _leaf(bl, "list", "list entries as a table")
    p.add_argument("--limit", type=int, default=50, help="rows to show, 0 for all (default 50)")
    p.set_defaults(func=_command(_cmd_list(ListKind.BLACKLIST)))

    p = _leaf(bl, "import", "add entries from CSV (address,reason,comment; header optional) "
                            "or from JSON lines, as export writes them")
    p.add_argument("file", metavar="FILE", help="CSV or JSON-lines file, or - for standard input")
    p.add_argument("--format", choices=["csv", "jsonl"],
                   help="the file's format (default: JSON lines if the first line starts "
                        "with {, else CSV)")
    p.add_argument("--force", action="store_true",
                   help="allow lines that blacklist a public mailbox provider's whole domain")
    p.set_defaults(func=_command(cmd_blacklist_import))

    p = _leaf(bl, "export", "write every entry as CSV or JSON lines")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv",
                   help="CSV with a header row, or one JSON object per line (default csv); "
                        "import reads both back")
    p.add_argument("--output", "-o", type=Path, help="file (default: standard output)")
    p.set_defaults(func=_command(cmd_blacklist_export))

    text = "recipients always delivered even if blacklisted (not after unsubscribe)"
    wl = subparsers.add_parser("whitelist", help=text, description=text).add_subparsers(
        dest="whitelist_command", required=True)

    p = _leaf(wl, "add", "whitelist an address or a domain (not a public mailbox provider's)")
    p.add_argument("target", metavar="ADDRESS_OR_DOMAIN",
                   help="user@example.com, example.com or @example.com")
    p.add_argument("--reason", required=True, metavar="TEXT",
                   help="why it must always be delivered (stored with the entry)")
    p.add_argument("--expires", metavar="DAYS|DATE",
                   help="the entry stops applying after DAYS days, or at DATE (2027-01-31 UTC, or ISO 8601)")
    p.set_defaults(func=_command(cmd_whitelist_add))

    p = _leaf(wl, "remove", "remove an address or domain from the whitelist")
    p.add_argument("target", metavar="ADDRESS_OR_DOMAIN", help="the entry to remove")
    p.set_defaults(func=_command(_cmd_remove(ListKind.WHITELIST)))

    p = _leaf(wl, "list", "list entries as a table")
    p.add_argument("--limit", type=int, default=50, help="rows to show, 0 for all (default 50)")
    p.set_defaults(func=_command(_cmd_list(ListKind.WHITELIST)))


def _leaf(parent: Subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
    config_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--subaccount", metavar="NAME", help="the list of this subaccount")
    g.add_argument("--global", dest="global_", action="store_true", help="the list for all subaccounts")
    return p


# --- running a command ----------------------------------------------------------------


def _command(fn: Callable[[argparse.Namespace, _Ctx], int]) -> Callable[[argparse.Namespace], int]:
    """Load the policy, connect, run `fn`; every expected failure becomes one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        url = "?"
        try:
            policy = _load_policy(args)
            url = policy.redis_url
            scope = _scope(args, policy)
            client = sync_client(url, socket_connect_timeout=5, socket_timeout=60)
            try:
                return fn(args, _Ctx(policy, scope, SyncSuppressionStore(client, local_part=LOCAL_PART)))
            finally:
                client.close()
        except _Fail as e:
            print(f"relaylab: {e}", file=sys.stderr)
            return e.code
        except (redis.ConnectionError, redis.TimeoutError) as e:
            print(f"relaylab: cannot reach Redis at {_redact(url)}: {e}", file=sys.stderr)
            return 1
        except redis.RedisError as e:
            print(f"relaylab: Redis error: {e}", file=sys.stderr)
            return 1
        except CorruptEntry as e:
            print(f"relaylab: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `relaylab blacklist export | head`: stop quietly
            return closed_pipe_exit()

    return run


def _load_policy(args: argparse.Namespace) -> Policy:
    path = config_path(args)
    try:
        return load_policy(path, check_keys=False)  # key files do not matter here
    except ConfigError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        raise _Fail(f"{len(e.problems)} problem(s) in {path}") from None


def _scope(args: argparse.Namespace, policy: Policy) -> Scope:
    if args.global_:
        return GLOBAL
    name: str = args.subaccount
    if policy.subaccount(name) is None:
        known = ", ".join(s.name for s in policy.subaccounts)
        raise _Fail(f"unknown subaccount {name!r} (configured: {known})")
    return name


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    return url


def _target(text: str) -> tuple[Kind, str]:
    try:
        return parse_target(text, LOCAL_PART)
    except InvalidAddress as e:
        raise _Fail(str(e)) from None


def _expiry(text: str | None, now: int) -> int | None:
    if text is None:
        return None
    t = text.strip()
    if t.isdigit() and len(t) <= 5:
        return now + int(t) * 86_400
    try:
        at = parse_time(t)
    except ValueError as e:
        raise _Fail(f"--expires: {e}") from None
    if at <= now:
        raise _Fail(f"--expires: {t} is in the past")
    return at


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


# --- commands -------------------------------------------------------------------------


def cmd_blacklist_add(args: argparse.Namespace, ctx: _Ctx) -> int:
    now = int(time.time())
    kind, value = _target(args.target)
    entry = Entry(value, kind, Reason(args.reason), Source.CLI, now, args.comment.strip(),
                  _expiry(args.expires, now))
    try:
        result = ctx.store.add(ctx.scope, entry, force=args.force)
    except Refused as e:
        raise _Fail(f"refused: {e}") from None
    if result == "added":
        print(f"added {kind.value} {value} to {ctx.where(ListKind.BLACKLIST)} ({entry.reason.value})")
    else:
        old = ctx.store.get(ctx.scope, ListKind.BLACKLIST, kind, value)
        since = f": {old.reason.value} since {_day(old.created_at)}" if old else ""
        print(f"{value} is already on {ctx.where(ListKind.BLACKLIST)}{since} (unchanged)")
    return 0


def cmd_whitelist_add(args: argparse.Namespace, ctx: _Ctx) -> int:
    now = int(time.time())
    kind, value = _target(args.target)
    # The operator's written reason is the comment; the enum reason of a whitelist entry
    # is always "manual".
    entry = Entry(value, kind, Reason.MANUAL, Source.CLI, now, args.reason.strip(),
                  _expiry(args.expires, now))
    try:
        result = ctx.store.whitelist_add(ctx.scope, entry, now=now,
                                         subaccounts=[s.name for s in ctx.policy.subaccounts])
    except Refused as e:
        raise _Fail(f"refused: {e}") from None
    if result == "added":
        print(f"added {kind.value} {value} to {ctx.where(ListKind.WHITELIST)}")
    else:
        print(f"{value} is already on {ctx.where(ListKind.WHITELIST)} (unchanged)")
    return 0


def _cmd_remove(which: ListKind) -> Callable[[argparse.Namespace, _Ctx], int]:
    def cmd(args: argparse.Namespace, ctx: _Ctx) -> int:
        kind, value = _target(args.target)
        if ctx.store.remove(ctx.scope, which, kind, value):
            print(f"removed {value} from {ctx.where(which)}")
            return 0
        raise _Fail(f"{value} is not on {ctx.where(which)}")

    return cmd


def cmd_blacklist_show(args: argparse.Namespace, ctx: _Ctx) -> int:
    now = int(time.time())
    kind, value = _target(args.target)
    entry = ctx.store.get(ctx.scope, ListKind.BLACKLIST, kind, value)
    if entry is None:
        raise _Fail(f"{value} is not on {ctx.where(ListKind.BLACKLIST)}")
    expires = "never" if entry.expires_at is None else format_time(entry.expires_at)
    print(f"{value} ({kind.value}) on {ctx.where(ListKind.BLACKLIST)}")
    print(f"  reason:    {entry.reason.value}")
    print(f"  comment:   {entry.comment or '-'}")
    print(f"  source:    {entry.source.value}")
    print(f"  created:   {format_time(entry.created_at)}")
    print(f"  expires:   {expires}{'' if entry.active(now) else ' (expired: no effect)'}")
    wl_scopes: list[Scope] = [GLOBAL] if ctx.scope is GLOBAL else [ctx.scope, GLOBAL]
    overrides = [(s, e) for s, e in ctx.store.matches(ListKind.WHITELIST, wl_scopes, kind, value)
                 if e.active(now)]
    if not overrides:
        note = " (a subaccount's whitelist may override it there)" if ctx.scope is GLOBAL else ""
        print(f"  whitelist: no entry overrides it{note}")
    for s, w in overrides:
        where = "global whitelist" if s is GLOBAL else f"whitelist of subaccount {s}"
        effect = "but an unsubscribe cannot be overridden" if entry.reason is Reason.UNSUBSCRIBE \
            else "overrides it"
        print(f"  whitelist: {w.value} on the {where} ({w.comment}) {effect}")
    return 0


def _cmd_list(which: ListKind) -> Callable[[argparse.Namespace, _Ctx], int]:
    def cmd(args: argparse.Namespace, ctx: _Ctx) -> int:
        total = ctx.store.count(ctx.scope, which)
        if which is ListKind.BLACKLIST:
            print(f"{'ADDRESS OR DOMAIN':<40} {'REASON':<14} {'SOURCE':<16} {'CREATED':<10} "
                  f"{'EXPIRES':<10} COMMENT")
        else:  # a whitelist entry's reason is the operator's text (its enum reason is "manual")
            print(f"{'ADDRESS OR DOMAIN':<40} {'SOURCE':<16} {'CREATED':<10} {'EXPIRES':<10} REASON")
        shown = 0
        for e in ctx.store.iter_entries(ctx.scope, which):
            if args.limit and shown >= args.limit:
                break
            expires = "-" if e.expires_at is None else _day(e.expires_at)
            comment = " ".join(e.comment.split())
            if which is ListKind.WHITELIST:
                print(f"{e.value:<40} {e.source.value:<16} {_day(e.created_at):<10} "
                      f"{expires:<10} {comment}")
            else:
                comment = comment if len(comment) <= 60 else comment[:57] + "..."
                print(f"{e.value:<40} {e.reason.value:<14} {e.source.value:<16} "
                      f"{_day(e.created_at):<10} {expires:<10} {comment}")
            shown += 1
        print(f"{shown} of {total} entries on {ctx.where(which)}"
              + (" (--limit 0 shows all)" if shown < total else ""))
        return 0

    return cmd


def cmd_blacklist_import(args: argparse.Namespace, ctx: _Ctx) -> int:
    now = int(time.time())
    invalid: list[ParseError] = []
    n_invalid = lines = 0
    with _open_input(args.file) as (text, binary, size):
        progress = _Progress(sys.stderr, size, binary)

        def entries() -> Iterator[Entry]:
            nonlocal n_invalid, lines
            for line_no, item in read_entries(text, args.format, now=now, local_part=LOCAL_PART):
                lines += 1
                progress.tick(lines)
                if isinstance(item, Entry):
                    try:
                        check_blacklist_entry(item, force=args.force)
                        yield item
                        continue
                    except Refused as e:
                        item = ParseError(line_no, item.value, f"refused: {e}")
                n_invalid += 1
                if len(invalid) < MAX_REPORTED:
                    invalid.append(item)

        try:
            counts = ctx.store.add_many(ctx.scope, entries(), force=args.force)
        except CsvFormatError as e:
            raise _Fail(f"{args.file}: {e}; nothing imported") from None
        except KeyboardInterrupt:
            progress.done()
            print(f"interrupted after {lines} lines; entries read before that may have been added",
                  file=sys.stderr)
            return 130
        progress.done()
    # The bad lines first, the summary last: on a terminal the totals stay in view.
    for err in invalid:
        print(err)
    if n_invalid > len(invalid):
        print(f"... and {n_invalid - len(invalid)} more invalid lines")
    print(f"added {counts.added}, already present {counts.present}, invalid {n_invalid}")
    return 1 if n_invalid else 0


def cmd_blacklist_export(args: argparse.Namespace, ctx: _Ctx) -> int:
    write = write_csv if args.format == "csv" else write_jsonl
    entries = ctx.store.iter_entries(ctx.scope, ListKind.BLACKLIST)
    if args.output is None:
        n = write(entries, sys.stdout)
        sys.stdout.flush()
    else:
        # Written next to the target and renamed: a failed export never leaves half a file.
        out: Path = args.output
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
        try:
            with open(fd, "w", encoding="utf-8", newline="") as f:
                n = write(entries, f)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    print(f"exported {n} entries from {ctx.where(ListKind.BLACKLIST)}"
          + (f" to {args.output}" if args.output else ""), file=sys.stderr)
    return 0


# --- import input and progress --------------------------------------------------------


@contextlib.contextmanager
def _open_input(name: str) -> Iterator[tuple[TextIO, BinaryIO | None, int | None]]:
    """(text stream, binary stream for the read position, size in bytes if known)."""
    if name == "-":
        text = _text(sys.stdin.buffer)
        try:
            yield text, None, None
        finally:
            text.detach()  # closing the wrapper would close the process's stdin
        return
    try:
        f = open(name, "rb")
    except OSError as e:
        raise _Fail(f"cannot read {name}: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        yield _text(f), f, size


def _text(binary: BinaryIO) -> io.TextIOWrapper:
    # errors="replace": a non-UTF-8 byte becomes U+FFFD, which read_csv reports per line
    # (Excel often saves CSV as Windows-1250) instead of aborting mid-file.
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace", newline="")


class _Progress:
    """Lines read and rate on stderr: a \\r-updated bar on a terminal, else a line every 5 s."""

    def __init__(self, out: TextIO, size: int | None, binary: BinaryIO | None) -> None:
        self.out = out
        self.size = size
        self.binary = binary
        self.tty = out.isatty()
        self.start = self.last = time.monotonic()
        self.lines = 0
        self.shown = False

    def tick(self, lines: int) -> None:
        self.lines = lines
        if lines % 1000:
            return
        t = time.monotonic()
        if t - self.last >= (0.2 if self.tty else 5.0):
            self.last = t
            self._show(t)

    def _show(self, t: float) -> None:
        rate = self.lines / max(t - self.start, 1e-9)
        pct = ""
        if self.size and self.binary is not None:
            with contextlib.suppress(OSError, ValueError):
                frac = min(self.binary.tell() / self.size, 1.0)
                pct = f" {frac:4.0%}" if not self.tty else \
                    f" [{'#' * int(frac * 30):<30}] {frac:4.0%}"
        msg = f"import: {self.lines:,} lines, {rate:,.0f} lines/s{pct}"
        if self.tty:
            self.out.write(f"\r{msg}\x1b[K")
        else:
            self.out.write(msg + "\n")
        self.out.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self._show(time.monotonic())
            if self.tty:
                self.out.write("\n")
            self.out.flush()
