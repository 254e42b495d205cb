"""`relaylab postfix config`: the Postfix settings a relay host needs, as `postconf` commands.

Why commands and not a main.cf fragment to paste: Debian's stock main.cf already sets
`smtpd_relay_restrictions`, and a pasted second entry makes Postfix warn "overriding
earlier entry" on every command. `postconf -e` replaces a setting in place or appends it,
and `postconf -M`/`-P` edit master.cf the same way, so applying the lines twice changes
nothing. The commands honour `MAIL_CONFIG` (another Postfix instance's config directory).

The restrictions, and why they are in these lists:

* ``smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination``:
  authenticated clients may relay, everyone else only to this host's own domains. No
  ``permit_mynetworks``: every SMTP client of the relay authenticates, so its mail is
  counted and signed (the host's own mail through sendmail/pickup is not affected).
* ``smtpd_recipient_restrictions = check_policy_service ...`` on its own: Postfix
  evaluates this list after the relay list, whatever permitted there, so policyd sees
  every recipient that may relay, and a ``permit`` elsewhere cannot skip it.
* ``smtpd_end_of_data_restrictions``: policyd counts the message (``recipient_count``).
* the ``submission`` service (port 587) takes only authenticated clients.
* ``enable_long_queue_ids = yes``: logd correlates log lines and the milter's notes by
  queue id for days; a short id is the queue file's inode number and comes back.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

import attrs

from relaylab.policy.model import Policy, SendingIp

__all__ = ["PostconfCommand", "apply", "commands", "script", "transport_commands", "transports"]

MILTER_MAIL_MACROS = "i {auth_type} {auth_authen} {auth_author} {mail_addr}"


@attrs.frozen
class PostconfCommand:
    argv: tuple[str, ...]
    comment: str = ""  # printed above the command
    # A master.cf service ("submission/inet"): run only if master.cf has no such entry,
    # so an operator's own entry (TLS options ...) is kept and only gets our -P options.
    unless_service: str = ""


def _inet(host: str, port: int) -> str:
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"


def commands(policy: Policy) -> list[PostconfCommand]:
    """The postconf invocations, in the order to run them."""
    m, p = policy.milter, policy.policyd
    policy_service = (f"check_policy_service {{ {_inet(p.listen_host, p.listen_port)}, "
                      "timeout=10s, default_action=DEFER_IF_PERMIT }")

    def main(name: str, value: str, comment: str = "") -> PostconfCommand:
        return PostconfCommand(("postconf", "-e", f"{name} = {value}"), comment)

    out = [
        main("smtpd_sasl_auth_enable", "yes",
             "Customers log in with their subaccount's SASL login (the SASL backend, Cyrus\n"
             "or Dovecot, is yours to set up: see the README)."),
        main("smtpd_relay_restrictions", "permit_sasl_authenticated, reject_unauth_destination",
             "Authenticated clients relay; others only reach this host's own domains."),
        main("smtpd_recipient_restrictions", policy_service,
             "Sending limits: policyd sees every recipient the relay list let through\n"
             "(its own list: a permit in smtpd_relay_restrictions does not skip it)."),
        main("smtpd_end_of_data_restrictions", policy_service,
             "policyd counts each message once it has arrived."),
    ]
    if p.usage_header:
        out.append(main("smtpd_data_restrictions", policy_service,
                        "policyd.usage_header: PREPEND X-Relaylab-Usage at DATA."))
    out += [
        main("smtpd_milters", _inet(m.listen_host, m.listen_port),
             "The milter: headers, tracking, DKIM signing. It signs, so it must be the last\n"
             "milter if you keep others (list them before it)."),
        main("milter_protocol", "6"),
        main("milter_default_action", "tempfail",
             "Milter down or slow: 4xx, senders retry; nothing is relayed unsigned."),
        main("milter_connect_timeout", "10s"),
        main("milter_command_timeout", "10s"),
        main("milter_content_timeout", "60s"),
        main("milter_mail_macros", MILTER_MAIL_MACROS),
        main("enable_long_queue_ids", "yes",
             "relaylab logd matches each delivery line to its message by queue id: short ids\n"
             "are reused (they are inode numbers), long ones never. Existing queue files keep\n"
             "their names."),
        PostconfCommand(("postconf", "-M", "submission/inet = submission inet n - y - - smtpd"),
                        "master.cf: the submission port (587), authenticated clients only (an\n"
                        "existing submission entry is kept; the -P lines add to it).",
                        unless_service="submission/inet"),
        PostconfCommand(("postconf", "-P", "submission/inet/syslog_name = postfix/submission")),
        PostconfCommand(("postconf", "-P", "submission/inet/smtpd_sasl_auth_enable = yes")),
        PostconfCommand(("postconf", "-P",
                         "submission/inet/smtpd_relay_restrictions = permit_sasl_authenticated,reject")),
    ]
    b = policy.bounces
    if b.enabled and b.domain is not None:
        out += [
            main("relay_domains", f"$mydestination, {b.domain}",
                 "Asynchronous bounces: accept mail for the VERP domain (its MX points here;\n"
                 "add any other domain you relay for) ..."),
            main("transport_maps",
                 f"inline:{{ {b.domain}={_lmtp(b.listen_host, b.listen_port)} }}",
                 "... and hand it to relaylab bounces over LMTP (with transport_maps already\n"
                 "set, add this entry to your map instead)."),
        ]
    return out


def _lmtp(host: str, port: int) -> str:
    return f"lmtp:inet:[{host}]:{port}" if ":" in host else f"lmtp:inet:{host}:{port}"


def script(policy: Policy) -> str:
    """The commands as a shell script (what `relaylab postfix config` prints)."""
    lines = [f"# Postfix settings for the Relaylab policy {policy.source}.",
             "# Run as root (or: relaylab postfix config --apply), then: postfix reload"]
    for c in commands(policy):
        if c.comment:
            lines += ["", *(f"# {line}" for line in c.comment.splitlines())]
        cmd = shlex.join(c.argv)
        if c.unless_service:
            cmd = f"postconf -M {shlex.quote(c.unless_service)} | grep -q . || {cmd}"
        lines.append(cmd)
    return "\n".join(lines) + "\n"


def apply(cmds: Sequence[PostconfCommand]) -> None:
    """Run the commands; raises subprocess.CalledProcessError (stderr captured) or OSError."""
    for c in cmds:
        if c.unless_service:
            present = subprocess.run(["postconf", "-M", c.unless_service], check=True,
                                     stdin=subprocess.DEVNULL, capture_output=True).stdout
            if present.strip():
                continue
        subprocess.run(list(c.argv), check=True, stdin=subprocess.DEVNULL, capture_output=True)


def transports(policy: Policy) -> str:
    """master.cf and main.cf lines for the policy's sending addresses (what `relaylab
    postfix transports` prints): one smtp(8) clone per address, bound to it. policyd sends
    each subaccount's (or plan's) mail to its address's transport with `FILTER NAME:` at
    RCPT TO, chosen by the SASL login: nothing a client writes in the message selects it."""
    if not policy.sending_ips:
        return (f"# {policy.source}: no sending_ips: every message leaves by Postfix's "
                "default transport\n")
    lines = [f"# Sending addresses of the Relaylab policy {policy.source}.",
             "# master.cf: append these services (or: relaylab postfix transports --apply),",
             "# then: postfix reload"]
    for ip in policy.sending_ips:
        lines += ["", f"# {ip.address}: {_users(policy, ip)}", _SERVICE.format(ip.transport)]
        lines += [f"  -o {name}={value}" for name, value in _options(ip)]
    lines += ["", "# main.cf: a FILTER without a next hop goes to default_filter_nexthop, or,",
              "# when that is empty (the default), to the recipient's domain (by MX). Relaying",
              "# through a smarthost (relayhost)? FILTER bypasses relayhost: set",
              "#   postconf -e \"default_filter_nexthop = $(postconf -h relayhost)\"",
              "# Every address must be configured on this host (relaylab check tries to bind",
              "# each one)."]
    return "\n".join(lines) + "\n"


_SERVICE = "{0} unix - - n - - smtp"


def _users(policy: Policy, ip: SendingIp) -> str:
    users = [s.name for s in policy.subaccounts if s.route and ip in s.route.ips]
    users += [f"plan {p.name}" for p in policy.plans if p.sending and ip in p.sending.ips]
    users += [f"pool {p.name}" for p in policy.ip_pools if ip in p.ips]
    return ", ".join(users) or "not used yet"


def _options(ip: SendingIp) -> list[tuple[str, str]]:
    """The -o options of an address's transport."""
    out = [("syslog_name", f"postfix/{ip.transport}"),
           # This address family only: no fallback to the host's default address.
           ("inet_protocols", "ipv6" if ip.ipv6 else "ipv4"),
           ("smtp_bind_address6" if ip.ipv6 else "smtp_bind_address", ip.address),
           # Cannot bind it (address gone)? Defer, rather than leave from another.
           ("smtp_bind_address_enforce", "yes")]
    if ip.helo:
        out.append(("smtp_helo_name", ip.helo))
    return out


def transport_commands(policy: Policy) -> list[PostconfCommand]:
    """`relaylab postfix transports --apply`: the services as postconf commands. `-M`
    replaces a service's whole entry (options an earlier run set included), so running
    them again after a policy change leaves exactly the policy's options."""
    out = []
    for ip in policy.sending_ips:
        t = ip.transport
        out.append(PostconfCommand(("postconf", "-M", f"{t}/unix = {_SERVICE.format(t)}"),
                                   f"{ip.address}: {_users(policy, ip)}"))
        out += [PostconfCommand(("postconf", "-P", f"{t}/unix/{name} = {value}"))
                for name, value in _options(ip)]
    return out
