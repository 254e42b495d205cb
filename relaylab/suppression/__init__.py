"""Suppression lists: recipients a subaccount must never mail (hard bounces, complaints,
unsubscribes, manual entries), whitelists that override them, and their Redis schema.

The RCPT TO check is `SuppressionStore.lookup` (one Redis round trip) over the pure
`decide`; operators use `relaylab blacklist|whitelist ...` (relaylab.suppression.cli).
"""

from relaylab.suppression.decide import REFUSE_CODE, REFUSE_STATUS, Verdict, decide
from relaylab.suppression.freemail import is_freemail
from relaylab.suppression.model import GLOBAL, CorruptEntry, Entry, Kind, ListKind, Reason, Scope, Source
from relaylab.suppression.normalize import InvalidAddress, normalize_address, normalize_domain, parse_target
from relaylab.suppression.store import AddCounts, Refused, SuppressionStore, SyncSuppressionStore

__all__ = [
    "GLOBAL",
    "REFUSE_CODE",
    "REFUSE_STATUS",
    "AddCounts",
    "CorruptEntry",
    "Entry",
    "InvalidAddress",
    "Kind",
    "ListKind",
    "Reason",
    "Refused",
    "Scope",
    "Source",
    "SuppressionStore",
    "SyncSuppressionStore",
    "Verdict",
    "decide",
    "is_freemail",
    "normalize_address",
    "normalize_domain",
    "parse_target",
]
