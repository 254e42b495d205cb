"""The `relaylab` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from relaylab.cliargs import (
    closed_pipe_exit,
    command,
    config_arg,
    config_path,
    load_or_exit,
    service_args,
    start_metrics,
)
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.suppression.cli import register as register_suppression

if TYPE_CHECKING:
    from relaylab.postfixconf import PostconfCommand


def cmd_check(args: argparse.Namespace) -> int:
    from relaylab import startcheck

    policy = load_or_exit(args)
    m = policy.milter
    print(f"{policy.source}: OK")
    print(f"redis {policy.redis_url}; milter {m.listen_host}:{m.listen_port}; "
          f"unauthenticated={m.unauthenticated.value}; missing_key={m.missing_key.value}")
    print("plans: " + ", ".join(f"{p.name} ({p.hourly_limit}/h, {p.max_sessions} sessions, "
                                f"{p.retention_days}d)" for p in policy.plans))
    for s in policy.subaccounts:
        print(f"subaccount {s.name}: {s.traffic.value}, plan {s.plan.name}, "
              f"logins {', '.join(s.logins)}"
              + (f", sends from {s.route.describe()}" if s.route else ""))
        for d in s.domains:
            keys = ", ".join(f"{k.selector} ({k.algorithm.value})" for k in d.keys)
            print(f"  {d.name}: {keys}")

    # What the services would trip over at start, beyond the policy itself.
    user = args.as_user or startcheck.unit_user(args.unit)
    if user is not None and os.geteuid() != 0 and user != pwd.getpwuid(os.geteuid()).pw_name:
        print(f"error: checking files as user {user} needs root (or pass --as-user "
              f"{pwd.getpwuid(os.geteuid()).pw_name})", file=sys.stderr)
        return 1
    try:
        findings = startcheck.read_findings(policy, user)
    except KeyError:
        print(f"error: no user {user!r} (--as-user, or User= in {args.unit})", file=sys.stderr)
        return 1
    print(f"files readable by {user or 'this user'}: "
          f"{len(startcheck.files_to_read(policy)) - len(findings)} of "
          f"{len(startcheck.files_to_read(policy))}")
    findings += startcheck.port_findings(startcheck.listen_ports(policy))
    findings += startcheck.sending_ip_findings(policy)
    findings += startcheck.transport_findings(policy)
    for warning in (startcheck.tracker_finding(policy), startcheck.redis_finding(policy.redis_url)):
        if warning is not None:
            findings.append(warning)
    for f in findings:
        print(f, file=sys.stderr)
    return 1 if any(f.level == "error" for f in findings) else 0


def cmd_postfix_config(args: argparse.Namespace) -> int:
    from relaylab import postfixconf

    policy = load_or_exit(args, check_keys=False)
    if not args.apply:
        sys.stdout.write(postfixconf.script(policy))
        return 0
    return _postconf(postfixconf.commands(policy))


def _postconf(cmds: Sequence[PostconfCommand]) -> int:
    import subprocess

    from relaylab import postfixconf

    try:
        postfixconf.apply(cmds)
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or b"").decode(errors="replace").strip()
        print(f"relaylab: {' '.join(e.cmd)} failed: {detail}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"relaylab: cannot run postconf: {e.strerror or e}", file=sys.stderr)
        return 1
    print("applied; now run: postfix check && postfix reload")
    return 0


def cmd_postfix_transports(args: argparse.Namespace) -> int:
    from relaylab import postfixconf

    policy = load_or_exit(args, check_keys=False)
    if not args.apply:
        sys.stdout.write(postfixconf.transports(policy))
        return 0
    if not policy.sending_ips:
        print(f"{policy.source}: no sending_ips: nothing to apply")
        return 0
    return _postconf(postfixconf.transport_commands(policy))


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the policy, then ask the running services to apply it (as SIGHUP does)."""
    from relaylab.policy.reloader import request_reload

    load_or_exit(args)  # a broken file is reported here and never requested
    try:
        trigger = request_reload(config_path(args))
    except OSError as e:
        print(f"relaylab: cannot write the reload request: {e}", file=sys.stderr)
        return 1
    print(f"reload requested ({trigger}); the milter, policyd and tracker apply it within "
          f"a second, removals included (see their event=reloaded log lines)")
    return 0


def cmd_milter(args: argparse.Namespace) -> int:
    from milter.server import listen_socket, run
    from relaylab.logfmt import setup_logging

    setup_logging(args.log_level)
    # Fail fast with the same report as `relaylab check`, except for key files: one that
    # this user cannot read or parse is logged by each worker and tempfails its domain,
    # and the others are served (serve() below).
    policy = load_or_exit(args, check_keys=False)
    host, port = args.listen or (policy.milter.listen_host, policy.milter.listen_port)
    try:
        sock = listen_socket(host, port)
    except OSError as e:
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    if not start_metrics("milter", policy, multiprocess_mode=True):
        return 1
    run(config_path(args), sock, args.workers or policy.milter.workers)
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from relaylab.dkim.keygen import (
        KeyWriteError,
        generate_key,
        genkey_txt,
        record_name,
        record_path,
        record_value,
        txt_record,
        write_private_key,
        write_record,
    )
    from relaylab.policy.model import DkimAlgorithm

    algorithm = {"rsa": DkimAlgorithm.RSA_SHA256,
                 "ed25519": DkimAlgorithm.ED25519_SHA256}[args.algorithm]
    out: Path = args.out or Path("keys") / f"{args.domain}.{args.selector}.key"
    txt = record_path(out)
    if not args.force and os.path.lexists(txt):  # before a key exists without its record
        print(f"relaylab: {txt} already exists (pass --force to replace it)", file=sys.stderr)
        return 1
    try:
        key = generate_key(algorithm, args.bits)
        mode = write_private_key(key, out, overwrite=args.force)
    except (ValueError, KeyWriteError) as e:
        print(f"relaylab: {e}", file=sys.stderr)
        return 1
    try:
        write_record(args.domain, args.selector, key, txt, overwrite=args.force)
    except KeyWriteError as e:
        out.unlink()  # a key whose public half is lost is of no use
        print(f"relaylab: {e} (the key was not kept)", file=sys.stderr)
        return 1
    if args.print_record == "zone":
        print(genkey_txt(args.domain, args.selector, key), end="")
        return 0
    if args.print_record == "value":
        print(record_value(key))
        return 0
    size = f", {args.bits} bits" if args.algorithm == "rsa" else ""
    import grp

    group = grp.getgrgid(out.stat().st_gid).gr_name
    print(f"wrote {out} ({algorithm.value}{size}, mode {mode:04o}, group {group})")
    print(f"wrote {txt} (the DNS record in the zone-file form of opendkim-genkey)\n")
    print("Publish this DNS record (zone file syntax):")
    print(txt_record(args.domain, args.selector, key))
    print("\nor, in a DNS provider's web form:")
    print(f"  Name:  {record_name(args.domain, args.selector)}\n  Type:  TXT")
    print(f"  Value: {record_value(key)}")
    print("\nThen add to the policy, under the domain's dkim: list:")
    print(f"  - {{selector: {args.selector}, key: {out}, algorithm: {algorithm.value}}}")
    return 0


def cmd_dns_check(args: argparse.Namespace) -> int:
    from relaylab.dnscheck import (
        DnsCheckError,
        check_domain,
        configured_domains,
        format_verdict,
        make_resolver,
    )

    try:
        # Keys are checked per selector below, so one bad key file is one "fail" line.
        policy = load_policy(config_path(args), check_keys=False)
    except ConfigError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    try:
        resolver = make_resolver(args.nameserver, args.port, args.timeout)
        failed = False
        for domain in args.domains or configured_domains(policy):
            for v in check_domain(policy, domain, resolver):
                print(format_verdict(v))
                failed |= v.status == "fail" or (args.strict and v.status == "warn")
    except DnsCheckError as e:
        print(f"relaylab: {e}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from relaylab.metrics import SERVICES
    from relaylab.status import status

    policy = load_or_exit(args, check_keys=False)
    services = [s.strip() for s in args.services.split(",") if s.strip()] if args.services else None
    unknown = sorted(set(services or ()) - set(SERVICES))
    if unknown:
        print(f"error: --services: unknown {', '.join(unknown)} (services: {', '.join(SERVICES)})",
              file=sys.stderr)
        return 2
    return status(policy, services, sys.stdout)


def cmd_demo(args: argparse.Namespace) -> int:
    from relaylab.devstack.demo import run_demo

    return run_demo(args.workdir.resolve(), keep_running=not args.once)


def startcheck_default_unit() -> Path:
    from relaylab.startcheck import DEFAULT_UNIT

    return DEFAULT_UNIT


def version() -> str:
    try:
        return importlib.metadata.version("relaylab")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="relaylab", description=__doc__)
    ap.add_argument("--version", action="version", version=f"relaylab {version()}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(sub, "check", "validate the policy file and what the services need at start "
                              "(files, ports, Redis)")
    config_arg(p)
    p.add_argument("--as-user", metavar="USER",
                   help="check that USER can read the key and secret files (default: the "
                        "User= of --unit)")
    p.add_argument("--unit", type=Path, default=startcheck_default_unit(),
                   help="systemd unit whose User= the services run as "
                        "(default %(default)s)")
    p.set_defaults(func=cmd_check)

    pf = command(sub, "postfix", "Postfix integration").add_subparsers(
        dest="postfix_command", required=True, metavar="COMMAND")
    p = command(pf, "config", "print the postconf commands that point Postfix at the milter "
                              "and policyd (main.cf and master.cf)")
    config_arg(p)
    p.add_argument("--apply", action="store_true",
                   help="run them (honours MAIL_CONFIG), then `postfix reload` yourself")
    p.set_defaults(func=cmd_postfix_config)

    p = command(pf, "transports", "print the master.cf transports (smtp_bind_address, "
                                  "smtp_helo_name) of the policy's sending_ips")
    config_arg(p)
    p.add_argument("--apply", action="store_true",
                   help="write them with postconf -M/-P (honours MAIL_CONFIG), then "
                        "`postfix reload` yourself")
    p.set_defaults(func=cmd_postfix_transports)

    p = command(sub, "reload", "check the policy file, then have the running "
                "services apply it (as SIGHUP does, removals included)")
    config_arg(p)
    p.set_defaults(func=cmd_reload)

    p = command(sub, "milter", "run the milter (Postfix smtpd_milters)")
    service_args(p, "milter", workers=True)
    p.set_defaults(func=cmd_milter)

    dkim = command(sub, "dkim", "DKIM key management").add_subparsers(
        dest="dkim_command", required=True, metavar="COMMAND")
    p = command(dkim, "keygen", "create a signing key and print its DNS record")
    config_arg(p)
    p.add_argument("--domain", required=True, help="the sending domain the key signs for")
    p.add_argument("--selector", required=True,
                   help="the DKIM selector (the DNS name is SELECTOR._domainkey.DOMAIN)")
    p.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa",
                   help="rsa (rsa-sha256, default) or ed25519 (ed25519-sha256)")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--out", type=Path, help="key file (default keys/DOMAIN.SELECTOR.key)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing key file and its .txt record")
    p.add_argument("--print-record", nargs="?", const="zone", choices=["zone", "value"],
                   help="print only the DNS record, for scripts: `zone` (default) as in the "
                   ".txt file, `value` as the one-line TXT value")
    p.set_defaults(func=cmd_dkim_keygen)

    dns = command(sub, "dns", "DNS checks").add_subparsers(dest="dns_command", required=True,
                                                           metavar="COMMAND")
    p = command(dns, "check", "check SPF, DKIM and DMARC records of sending domains")
    config_arg(p)
    p.add_argument("domains", nargs="*", metavar="DOMAIN",
                   help="domains to check (default: every configured domain)")
    p.add_argument("--nameserver", help="ask this resolver IP instead of the system's")
    p.add_argument("--port", type=int, default=53, help="the resolver's port (default 53)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for each DNS answer (default 5)")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.set_defaults(func=cmd_dns_check)

    register_suppression(sub)
    from policyd.cli import register as register_policyd  # the policyd and limits commands

    register_policyd(sub)
    from tracker.cli import register as register_tracker

    register_tracker(sub)
    from logd.cli import register as register_logd

    register_logd(sub)
    from relaylab.events.cli import register as register_events

    register_events(sub)
    from bounces.cli import register as register_bounces

    register_bounces(sub)
    from webhooks.cli import register as register_webhooks

    register_webhooks(sub)
    from api.cli import register as register_api

    register_api(sub)

    p = command(sub, "status", "each service's health on one screen, from its metrics endpoint "
                "(metrics.enabled), and Redis; exit status 1 if anything is down")
    config_arg(p)
    p.add_argument("--services", metavar="LIST",
                   help="comma-separated services to check (default: those the policy configures)")
    p.set_defaults(func=cmd_status)

    p = command(sub, "demo", "run the whole relay on loopback and send a demo message")
    p.add_argument("--workdir", type=Path, default=Path("run/demo"),
                   help="where the throwaway servers keep their files (default run/demo)")
    p.add_argument("--once", action="store_true", help="exit after the demo message")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)  # --help and --version write here too
            rc: int = args.func(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:  # `relaylab dkim keygen ... | head -1`
        return closed_pipe_exit()
    return rc


if __name__ == "__main__":
    sys.exit(main())
