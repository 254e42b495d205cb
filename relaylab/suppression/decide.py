"""The RCPT TO decision over the four list lookups: pure, no I/O.

Rules, in order:
1. Expired entries do not exist.
2. No active blacklist entry (subaccount or global, address or domain): deliver.
3. An active whitelist entry (subaccount or global, address or domain) overrides the
   blacklist, except an `unsubscribe` entry: the recipient's choice wins over any
   whitelist, including one added before they unsubscribed.
4. Otherwise refuse. The entry reported is the most specific one: an address entry beats
   a domain entry, and the subaccount's list beats the global list.
"""

from __future__ import annotations

import time
from typing import Final, TypeAlias

import attrs

from relaylab.suppression.model import Entry, Reason

__all__ = ["REFUSE_CODE", "REFUSE_STATUS", "Pair", "Verdict", "decide"]

# (address entry, domain entry) for one list, as read by HMGET a:<address> d:<domain>.
Pair: TypeAlias = tuple[Entry | None, Entry | None]

REFUSE_CODE: Final = 550
REFUSE_STATUS: Final = (5, 7, 1)


@attrs.frozen
class Verdict:
    recipient: str
    refuse: bool
    # The blacklist entry behind the verdict: the refusing one, or the one a whitelist
    # overrode. None when the recipient is on no blacklist.
    entry: Entry | None = None
    global_list: bool = False  # `entry` comes from the global blacklist
    override: Entry | None = None  # the whitelist entry that let the recipient through

    def smtp_text(self) -> str:
        """"recipient suppressed: hardbounce since 2026-11-20" (UTC date of the entry)."""
        if self.entry is None:
            raise ValueError("no suppression entry behind this verdict")
        since = time.strftime("%Y-%m-%d", time.gmtime(self.entry.created_at))
        return f"recipient suppressed: {self.entry.reason.value} since {since}"


def decide(recipient: str, sub_wl: Pair, sub_bl: Pair, global_wl: Pair, global_bl: Pair,
           now: int) -> Verdict:
    # Most specific first: address before domain, subaccount before global.
    blocking = [(e, g) for e, g in ((sub_bl[0], False), (global_bl[0], True),
                                    (sub_bl[1], False), (global_bl[1], True))
                if e is not None and e.active(now)]
    if not blocking:
        return Verdict(recipient, refuse=False)
    allow = next((e for e in (sub_wl[0], global_wl[0], sub_wl[1], global_wl[1])
                  if e is not None and e.active(now)), None)
    if allow is None:
        entry, is_global = blocking[0]
        return Verdict(recipient, refuse=True, entry=entry, global_list=is_global)
    for entry, is_global in blocking:
        if entry.reason is Reason.UNSUBSCRIBE:
            return Verdict(recipient, refuse=True, entry=entry, global_list=is_global)
    entry, is_global = blocking[0]
    return Verdict(recipient, refuse=False, entry=entry, global_list=is_global, override=allow)
