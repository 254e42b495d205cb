"""The limits service: plan a request, count it in Redis (one Lua call), answer.

Every decision that involves a subaccount goes to Redis; there is no local cache of
counts, so any number of policyd processes on any number of mail hosts share the limits
exactly. The hot path is callback-based (`answer` returns the verdict, or a `Pending`
whose Redis reply is on its way) because a coroutine per request costs as much CPU as the
decision itself; `decide` is the awaitable form of the same thing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from policyd import decide
from policyd.decide import Check
from policyd.request import PolicyRequest, ProtocolState
from policyd.verdict import DUNNO, DeferIfPermit, Dunno, Filter, Prepend, Reject, Verdict
from relaylab.limits import lua, refund
from relaylab.logfmt import log_event, queue_id_var
from relaylab.metrics import metrics
from relaylab.policy.model import Plan
from relaylab.policy.reloader import PolicyHolder
from relaylab.resp import OnReply, RedisReplyError, RedisUnavailable, RespClient

log = logging.getLogger("relaylab.policyd")
_DEBUG = logging.DEBUG
# The sending limit behind a deferral (relaylab_limit_deferrals_total's label).
_LIMIT_OF = {lua.OVER_HOUR: "hourly", lua.OVER_MONTH: "monthly", lua.OVER_SESSIONS: "sessions"}


def count(verdict: Verdict) -> Verdict:
    """`verdict`, counted by its action (relaylab_policyd_decisions_total)."""
    kind = verdict.__class__
    metrics().policyd_action["dunno" if kind is Dunno else "defer" if kind is DeferIfPermit
                             else "reject" if kind is Reject else "filter" if kind is Filter
                             else "prepend"].inc()
    return verdict


class LimitStore:
    """ADMIT calls over one pipelined connection, with outage tracking: the first failure
    of an outage is logged once, and its end with its duration."""

    def __init__(self, client: RespClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self._clock = clock
        self._down_since: float | None = None
        self._failed = 0
        # EVALSHA/EVAL heads (array header, script, keys, hourly-constant arguments) per
        # subaccount: name -> (UTC hour, plan, session ttl, EVALSHA head, EVAL head).
        self._prefixes: dict[str, tuple[int, Plan, int, bytes, bytes]] = {}
        # False during an outage (until a reply goes through `result` again). An attribute,
        # not a property: `LimitService.finish` reads it for every decision.
        self.up = True

    def submit(self, check: Check, now: float, session_ttl: int, on_reply: OnReply) -> None:
        """Send the ADMIT call for `check`; `on_reply` gets Redis's raw reply (or error)."""
        sub = check.subaccount
        hour = int(now // 3600)
        cached = self._prefixes.get(sub.name)
        # Keys and the leading arguments change with the UTC hour, the plan or the TTL.
        if cached is None or cached[0] != hour or cached[1] is not sub.plan or cached[2] != session_ttl:
            call = check.call(now, session_ttl)
            prefix = self.client.script_prefix(lua.ADMIT, call.keys(), call.static_args())
            cached = (hour, sub.plan, session_ttl, *prefix.heads(5))
            self._prefixes[sub.name] = cached
        self.client.evalsha_head(cached[3], cached[4], _dynamic_args(now, check), on_reply)

    def leave_receipt(self, pending: Pending, reply: bytes) -> None:
        """Record what this END-OF-DATA counted, so that the milter can give it back if it
        refuses the message, and so that it is given back if the milter worker holding
        the session dies before its end of message (relaylab/limits/refund.py). Best
        effort: a lost receipt means the message stays counted, as without receipts."""
        minute = int(reply.split(b" ", 5)[4])
        check = pending.check
        k, a = refund.receipt_args(check.subaccount.name, pending.request.queue_id,
                                   pending.now, minute, check.add, check.session_id)
        self.client.evalsha(self.client.script_prefix(refund.RECEIPT, k, []), a, _ignore)

    def result(self, reply: Any) -> lua.AdmitResult | None:
        """The ADMIT result of a reply (or error) `submit` delivered; None if Redis failed."""
        try:
            if isinstance(reply, BaseException):
                raise reply
            result = lua.AdmitResult.from_reply(reply)
        except (RedisUnavailable, RedisReplyError, ValueError) as e:
            self._down(e)
            return None
        if self._down_since is not None:
            self._up()
        return result

    def _down(self, error: Exception) -> None:
        self._failed += 1
        m = metrics()
        m.redis_errors.inc()
        if self._down_since is None:
            self._down_since = self._clock()
            self.up = False
            m.redis_down.set(1)
            log_event(log, "redis_unavailable", logging.ERROR, redis=str(self.client.address),
                      error=f"{type(error).__name__}: {error}")

    def _up(self) -> None:
        assert self._down_since is not None
        outage = self._clock() - self._down_since
        log_event(log, "redis_recovered", logging.WARNING, redis=str(self.client.address),
                  outage_seconds=round(outage, 1), failed_decisions=self._failed)
        m = metrics()
        m.redis_outage_seconds.inc(outage)
        m.redis_down.set(0)
        self._down_since = None
        self.up = True
        self._failed = 0

    async def close(self) -> None:
        await self.client.close()


def _dynamic_args(now: float, check: Check) -> bytes:
    """ARGV 10-14 of ADMIT, RESP-encoded in one step (this runs for every decision)."""
    now_ms = b"%d" % int(now * 1000)
    sid = check.session_id.encode()
    need, add, mode = check.need, check.add, check.session_mode
    return b"$%d\r\n%b\r\n%b%b$%d\r\n%b\r\n%b" % (
        len(now_ms), now_ms,
        _BULK_INTS.get(need) or _bulk(b"%d" % need), _BULK_INTS.get(add) or _bulk(b"%d" % add),
        len(sid), sid, _BULK_MODES.get(mode) or _bulk(mode.encode()))


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


# need and add (usually 0 or 1) and the session modes, encoded once.
_BULK_INTS = {n: _bulk(b"%d" % n) for n in range(100)}
_BULK_MODES = {m: _bulk(m.encode()) for m in (lua.SESSION_NONE, lua.SESSION_ENFORCE,
                                               lua.SESSION_KEEP)}


def _ignore(reply: Any) -> None:
    pass  # an outage shows in the ADMIT replies, which the outage tracking sees


class Pending:
    """A decision waiting for its Redis reply. Once `done`, `verdict()` gives the answer;
    `notify` (set by whoever waits) is called when the reply arrives."""

    __slots__ = ("check", "done", "notify", "now", "reply", "request", "service")

    def __init__(self, service: LimitService, request: PolicyRequest, check: Check,
                 now: float) -> None:
        self.service = service
        self.request = request
        self.check = check
        self.now = now
        self.done = False
        self.reply: Any = None
        self.notify: Callable[[], None] | None = None

    def resolve(self, reply: Any) -> None:
        self.reply = reply
        self.done = True
        if self.notify is not None:
            self.notify()

    def verdict(self) -> Verdict:
        return self.service.finish(self)


class LimitService:
    def __init__(self, holder: PolicyHolder, store: LimitStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.holder = holder
        self.store = store
        self._clock = clock
        self._dunno = metrics().policyd_action["dunno"]

    def answer(self, request: PolicyRequest) -> Verdict | Pending:
        policy = self.holder.policy
        step = decide.plan(request, policy)
        if not isinstance(step, Check):
            if not isinstance(step, Dunno):
                self._log(request, step, None)
            return count(step)
        now = self._clock()
        pending = Pending(self, request, step, now)
        self.store.submit(step, now, policy.policyd.session_ttl, pending.resolve)
        return pending

    def finish(self, pending: Pending) -> Verdict:
        reply = pending.reply
        if pending.check.add and pending.request.state is ProtocolState.END_OF_MESSAGE \
                and pending.request.queue_id and reply.__class__ is bytes and reply.startswith(b"0 "):
            self.store.leave_receipt(pending, reply)
        if (reply.__class__ is bytes and reply.startswith(b"0 ") and not pending.check.usage_header
                and self.store.up and not log.isEnabledFor(_DEBUG)):
            # Admitted, nothing to add (or only the subaccount's route): the common case,
            # without parsing.
            route = pending.check.route
            if route is None:
                self._dunno.inc()
                return DUNNO
            return count(route)
        result = self.store.result(reply)
        if result is None:
            return count(decide.unavailable(self.holder.policy.policyd, pending.check))
        verdict = count(decide.verdict(pending.check, result, pending.now))
        if verdict.__class__ is DeferIfPermit and result.status in _LIMIT_OF:
            metrics().limit_deferred[_LIMIT_OF[result.status]].inc()
        if verdict is DUNNO:
            if log.isEnabledFor(logging.DEBUG):
                self._log(pending.request, verdict, pending.check, logging.DEBUG)
        elif not isinstance(verdict, Prepend | Filter):  # routine: logged at debug only
            self._log(pending.request, verdict, pending.check)
        elif log.isEnabledFor(logging.DEBUG):
            self._log(pending.request, verdict, pending.check, logging.DEBUG)
        return verdict

    async def decide(self, request: PolicyRequest) -> Verdict:
        """`answer`, awaited (tests, tools)."""
        answer = self.answer(request)
        if isinstance(answer, Pending):
            if not answer.done:
                arrived = asyncio.Event()
                answer.notify = arrived.set
                await arrived.wait()
            return answer.verdict()
        return answer

    def _log(self, request: PolicyRequest, verdict: Verdict, check: Check | None,
             level: int = logging.INFO) -> None:
        token = queue_id_var.set(request.queue_id or None)
        try:
            log_event(log, "decision", level, state=request.state.value,
                      login=request.sasl_username,
                      subaccount=check.subaccount.name if check else "",
                      client=f"{request.client_address}:{request.client_port}",
                      action=verdict.action())
        finally:
            queue_id_var.reset(token)
