"""Decisions, as pure functions: which limits a request is checked against (`plan`) and
what to answer once Redis has counted (`verdict`). No I/O, no clock of their own.

Where the counting happens (count_mode ``message``, the default):

=================  =======================  ===========================================
protocol state     session slot             hourly limit / monthly quota
=================  =======================  ===========================================
MAIL, RCPT         take one (4xx if full)   check that 1 more fits; count nothing
DATA               keep                     check that recipient_count fits; PREPEND
                                            the usage header if configured
END-OF-MESSAGE     keep                     count recipient_count if it fits, else 4xx
=================  =======================  ===========================================

With count_mode ``recipient`` each RCPT counts 1 when it fits, and DATA/END-OF-MESSAGE
count nothing. "keep" refreshes a session's slot, or takes it back even beyond the
maximum: a session admitted at RCPT is never refused later for its slot.
"""

from __future__ import annotations

import math
import time

import attrs

from policyd.request import PolicyRequest, ProtocolState
from policyd.verdict import DUNNO, DeferIfPermit, Filter, Prepend, Reject, Verdict
from relaylab.limits import lua, window
from relaylab.limits.sessions import session_id
from relaylab.policy.model import (
    CountMode,
    Policy,
    PolicydSettings,
    RedisErrorAction,
    Subaccount,
    UnauthenticatedAction,
)

USAGE_HEADER = "X-Relaylab-Usage"

_ST = ProtocolState


@attrs.define(slots=True)  # one per request: a frozen __init__ costs more
class Check:
    """What to check and count in Redis for one request."""

    subaccount: Subaccount
    need: int  # must fit under the limits
    add: int  # counted now if it fits
    session_id: str  # "" = session not tracked (no client_port: Postfix < 3.5)
    session_mode: str  # lua.SESSION_*
    usage_header: bool
    # At RCPT: FILTER to the transport of the subaccount's sending address (None: Postfix's
    # default transport). Chosen from the SASL login's subaccount and, in a pool, the
    # recipient: nothing in the message can name it.
    route: Filter | None = None

    def call(self, now: float, session_ttl: int) -> lua.AdmitCall:
        plan = self.subaccount.plan
        return lua.AdmitCall(
            subaccount=self.subaccount.name, now=now, hourly_limit=plan.hourly_limit,
            monthly_quota=plan.monthly_quota, need=self.need, add=self.add,
            session_id=self.session_id, session_mode=self.session_mode,
            max_sessions=plan.max_sessions, session_ttl=session_ttl)


def plan(request: PolicyRequest, policy: Policy) -> Verdict | Check:
    st = request.state
    if st is not _ST.RCPT and st not in _OTHER_COUNTED:
        return DUNNO
    login = request.sasl_username
    sub = policy.subaccount_for_login(login) if login else None
    if sub is None:
        if policy.milter.unauthenticated is not UnauthenticatedAction.REJECT:
            return DUNNO
        return Reject("SASL login is not mapped to a subaccount" if login
                      else "Authentication required")
    sid = ""
    address, port = request.client_address, request.client_port
    if address and port:
        sid = session_id(address, port, request.server_address, request.server_port)
    settings = policy.policyd
    per_rcpt = settings.count_mode is CountMode.RECIPIENT
    # Check(subaccount, need, add, session_id, session_mode, usage_header), positionally:
    # this runs for every decision.
    if st is _ST.RCPT:
        pool = sub.sending or sub.plan.sending
        route = None if pool is None else _filter(pool.transport_for(request.recipient))
        return Check(sub, 1, 1 if per_rcpt else 0, sid, lua.SESSION_ENFORCE, False, route)
    if st is _ST.MAIL:
        return Check(sub, 1, 0, sid, lua.SESSION_ENFORCE, False)
    n = 0 if per_rcpt else max(request.recipient_count, 1)
    if st is _ST.DATA:
        return Check(sub, n, 0, sid, lua.SESSION_KEEP, settings.usage_header)
    return Check(sub, n, n, sid, lua.SESSION_KEEP, False)


_OTHER_COUNTED = (_ST.MAIL, _ST.DATA, _ST.END_OF_MESSAGE)  # and RCPT, tested first

_FILTERS: dict[str, Filter] = {}


def _filter(transport: str) -> Filter:
    """The FILTER verdict for a transport, made once (the names come from the policy)."""
    f = _FILTERS.get(transport)
    if f is None:
        f = _FILTERS[transport] = Filter(transport)
    return f


def verdict(check: Check, result: lua.AdmitResult, now: float) -> Verdict:
    sub = check.subaccount
    plan_ = sub.plan
    if result.status == lua.OVER_SESSIONS:
        return DeferIfPermit(
            f"Too many simultaneous SMTP sessions for subaccount {sub.name}: "
            f"{result.sessions} of {plan_.max_sessions} in use; retry when one ends")
    if result.status == lua.OVER_HOUR:
        limit = plan_.hourly_limit
        frees = window.frees_at(result.buckets, result.minute, limit, check.need)
        if frees is None:
            return Reject(f"{check.need} recipients exceed the hourly limit of {limit} messages "
                          f"of subaccount {sub.name}; split the message", status=(5, 5, 3))
        return DeferIfPermit(
            f"Hourly limit of {limit} messages reached for subaccount {sub.name}: "
            f"{result.hour_total} sent in the last 60 minutes; capacity frees at "
            f"{_hhmm(frees)} UTC (in {_minutes(frees - now)} min)")
    if result.status == lua.OVER_MONTH:
        quota = plan_.monthly_quota or 0
        if check.need > quota:
            return Reject(f"{check.need} recipients exceed the monthly quota of {quota} messages "
                          f"of subaccount {sub.name}; split the message", status=(5, 5, 3))
        return DeferIfPermit(
            f"Monthly quota of {quota} messages reached for subaccount {sub.name}: "
            f"{result.month_total} sent this month; it renews on "
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(window.next_month_start(now)))} UTC")
    if check.usage_header:
        return Prepend(USAGE_HEADER, usage_value(sub, result, check.need))
    if check.route is not None:
        return check.route
    return DUNNO


def usage_value(sub: Subaccount, result: lua.AdmitResult, pending: int) -> str:
    """``1234/60000 hour`` (plus ``, 5000/24000 month`` with a quota), counting `pending`."""
    text = f"{result.hour_total + pending}/{sub.plan.hourly_limit} hour"
    if sub.plan.monthly_quota:
        text += f", {result.month_total + pending}/{sub.plan.monthly_quota} month"
    return text


def unavailable(settings: PolicydSettings, check: Check | None = None) -> Verdict:
    """The answer while Redis cannot be reached (for `check`, if known). Letting mail
    through (on_redis_error: dunno) still sends it from its subaccount's address."""
    if settings.on_redis_error is RedisErrorAction.DUNNO:
        return DUNNO if check is None or check.route is None else check.route
    return DeferIfPermit("Sending limits cannot be checked right now; try again later",
                         status=(4, 3, 0))


def malformed() -> Verdict:
    """The answer to a complete request that cannot be decided (the framing is intact)."""
    return DeferIfPermit("Malformed policy request", status=(4, 3, 0))


def _hhmm(t: float) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def _minutes(seconds: float) -> int:
    return max(1, math.ceil(seconds / 60))
