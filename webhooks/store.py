"""Webhook state in Redis (keys: relaylab/suppression/keys.py, all in the subaccount's slot).

- The cursor is the id of the last events-stream entry made into batches. New batches and
  the cursor's move are written by one script that first checks the cursor is still where
  the batches were read from: a restart (or a second instance) never makes an event into
  two batches, and never skips one.
- A batch waits in the due set (score = when to send, unix ms). Taking it to send pushes
  its score past the request's timeout (a lease): a service killed mid-request leaves it
  there, and it is sent again once the lease runs out (at least once).
- After an attempt the batch is deleted (delivered), rescheduled, or moved to the
  dead-letter stream, each by one script, which also pushes the attempt onto the
  subaccount's capped list of recent attempts (relaylab/webhook_attempts.py): no round
  trip of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs

from relaylab.limits.lua import Script
from relaylab.resp import RespClient, encode_args, resp_client
from relaylab.suppression.keys import (
    events_key,
    webhook_attempts_key,
    webhook_batch_key,
    webhook_cursor_key,
    webhook_dead_key,
    webhook_due_key,
)
from relaylab.webhook_attempts import MAX_ATTEMPTS, Attempt
from relaylab.webhook_attempts import decode as decode_attempt
from relaylab.webhook_attempts import encode as encode_attempt
from webhooks.decide import Batch, Stage

__all__ = ["BatchState", "DeadLetter", "Store"]

ENQUEUE = Script("webhooks_enqueue", """
if ARGV[1] ~= '*' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 3, #KEYS do
  local j = 5 + (i - 3) * 3
  redis.call('HSET', KEYS[i], 'body', ARGV[j + 1], 'n', ARGV[j + 2], 'kind', ARGV[4],
             'created', ARGV[3], 'stage', 'primary', 'fails', '0', 'tries', '0')
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[j])
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2]) end
return 1
""")

CLAIM = Script("webhooks_claim", """
local ids = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return ids
""")

# Every script settling an attempt ends its KEYS with the attempts list and its ARGV with
# the attempt (JSON), the list's cap and its TTL (seconds): pushed even if the batch is gone.
NOTE = """
local function note(k, a)
  redis.call('LPUSH', k, ARGV[a])
  redis.call('LTRIM', k, 0, tonumber(ARGV[a + 1]) - 1)
  redis.call('EXPIRE', k, ARGV[a + 2])
end
"""

RESCHEDULE = Script("webhooks_reschedule", NOTE + """
note(KEYS[3], 7)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'stage', ARGV[3], 'fails', ARGV[4], 'tries', ARGV[5], 'error', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
""")

DEAD = Script("webhooks_dead", NOTE + """
note(KEYS[4], 6)
local b = redis.call('HMGET', KEYS[1], 'body', 'n', 'kind', 'created')
if b[1] then
  redis.call('XADD', KEYS[3], 'MINID', '~', ARGV[2], '*', 'batch', ARGV[1], 'n', b[2],
             'kind', b[3], 'created', b[4], 'tries', ARGV[3], 'error', ARGV[4], 'url', ARGV[5],
             'body', b[1])
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return b[1] and 1 or 0
""")

DELIVERED = Script("webhooks_delivered", NOTE + """
note(KEYS[3], 2)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
""")

REQUEUE = Script("webhooks_requeue", """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local f = {}
for i = 1, #e[1][2], 2 do f[e[1][2][i]] = e[1][2][i + 1] end
redis.call('HSET', KEYS[3], 'body', f['body'], 'n', f['n'], 'kind', 'requeued',
           'created', ARGV[2], 'stage', 'primary', 'fails', '0', 'tries', '0')
redis.call('ZADD', KEYS[2], ARGV[2], f['batch'])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
""")

SCRIPTS = (ENQUEUE, CLAIM, RESCHEDULE, DEAD, DELIVERED, REQUEUE)


@attrs.frozen
class BatchState:
    id: str
    body: bytes
    count: int
    stage: Stage
    fails: int
    tries: int
    kind: str


@attrs.frozen
class DeadLetter:
    entry: str  # its id in the dead-letter stream
    batch: str
    count: int
    tries: int
    error: str
    url: str
    body: bytes


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _entries(reply: list[Any]) -> list[tuple[str, dict[str, str]]]:
    """XRANGE's reply: (id, fields), decoded."""
    out = []
    for entry_id, flat in reply:
        it = iter(flat)
        out.append((entry_id.decode(), {k.decode(): v.decode() for k, v in zip(it, it,
                                                                             strict=True)}))
    return out


def _note(attempt: Attempt, keep_s: int) -> list[str | bytes]:
    return [encode_attempt(attempt), str(MAX_ATTEMPTS), str(max(1, keep_s))]


def client(url: str) -> RespClient:
    """The store's Redis client (relaylab/resp.py: its reply parser reads a 1,000-entry
    XRANGE several times faster than redis-py's pure-Python one), with the scripts."""
    return resp_client(url, scripts=SCRIPTS, connect_timeout=2.0, command_timeout=5.0)


class Store:
    """Raises relaylab.resp.RedisUnavailable or RedisReplyError when Redis fails."""

    def __init__(self, r: RespClient) -> None:
        self.r = r

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        """EVALSHA (EVAL if Redis does not know the script), awaited; an error reply raises."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_reply(reply: Any) -> None:
            if fut.done():
                return
            if isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
        self.r.evalsha_encoded(self.r.script_prefix(script, keys, ()), len(args),
                               encode_args(args), on_reply)
        return await fut

    async def cursor(self, sub: str) -> str:
        """Where this subaccount's batches continue; set on first use to the stream's last
        entry (events from before the webhook was configured are for `replay`)."""
        key = webhook_cursor_key(sub)
        cur = await self.r.execute("GET", key)
        if cur is not None:
            return _s(cur)
        last = await self.r.execute("XREVRANGE", events_key(sub), "+", "-", "COUNT", "1")
        await self.r.execute("SET", key, last[0][0] if last else "0-0", "NX")
        return _s(await self.r.execute("GET", key))

    async def read_after(self, sub: str, cursor: str, count: int
                         ) -> list[tuple[str, dict[str, str]]]:
        return _entries(await self.r.execute("XRANGE", events_key(sub), "(" + cursor, "+",
                                             "COUNT", str(count)))

    async def read_range(self, sub: str, start: str, end: str, count: int
                         ) -> list[tuple[str, dict[str, str]]]:
        return _entries(await self.r.execute("XRANGE", events_key(sub), start, end,
                                             "COUNT", str(count)))

    async def enqueue(self, sub: str, batches: Sequence[Batch], *, expected: str, cursor: str,
                      now_ms: int, kind: str) -> bool:
        """Store the batches, due now, and move the cursor from `expected` to `cursor`
        ('*' / '': no check / no move). False: the cursor had moved, nothing written."""
        keys = [webhook_cursor_key(sub), webhook_due_key(sub),
                *(webhook_batch_key(sub, b.id) for b in batches)]
        args: list[str | bytes] = [expected, cursor, str(now_ms), kind]
        for b in batches:
            args += [b.id, b.body, str(b.count)]
        return bool(await self._eval(ENQUEUE, keys, args))

    async def claim(self, sub: str, now_ms: int, lease_until_ms: int, limit: int) -> list[str]:
        ids = await self._eval(CLAIM, [webhook_due_key(sub)],
                               [str(now_ms), str(lease_until_ms), str(limit)])
        return [_s(i) for i in ids]

    async def load(self, sub: str, batch_id: str) -> BatchState | None:
        v = await self.r.execute("HMGET", webhook_batch_key(sub, batch_id),
                                 "body", "n", "stage", "fails", "tries", "kind")
        if v[0] is None:
            await self.r.execute("ZREM", webhook_due_key(sub), batch_id)
            return None
        return BatchState(batch_id, v[0], int(v[1] or 0), Stage(_s(v[2] or b"primary")),
                          int(v[3] or 0), int(v[4] or 0), _s(v[5] or b"live"))

    # After an attempt: `attempt` is what the list of recent attempts gets, kept for
    # `keep_s` seconds after the subaccount's last attempt.

    async def delivered(self, sub: str, batch_id: str, *, attempt: Attempt, keep_s: int
                        ) -> None:
        await self._eval(DELIVERED, [webhook_batch_key(sub, batch_id), webhook_due_key(sub),
                                     webhook_attempts_key(sub)],
                         [batch_id, *_note(attempt, keep_s)])

    async def reschedule(self, sub: str, batch_id: str, *, due_ms: int, stage: Stage, fails: int,
                         tries: int, error: str, attempt: Attempt, keep_s: int) -> None:
        await self._eval(RESCHEDULE, [webhook_batch_key(sub, batch_id), webhook_due_key(sub),
                                      webhook_attempts_key(sub)],
                         [batch_id, str(due_ms), stage.value, str(fails), str(tries), error,
                          *_note(attempt, keep_s)])

    async def dead(self, sub: str, batch_id: str, *, minid_ms: int, tries: int, error: str,
                   url: str, attempt: Attempt, keep_s: int) -> None:
        await self._eval(DEAD, [webhook_batch_key(sub, batch_id), webhook_due_key(sub),
                                webhook_dead_key(sub), webhook_attempts_key(sub)],
                         [batch_id, str(minid_ms), str(tries), error, url,
                          *_note(attempt, keep_s)])

    async def attempts(self, sub: str, count: int = MAX_ATTEMPTS) -> list[Attempt]:
        """The subaccount's recent delivery attempts, newest first."""
        raw = await self.r.execute("LRANGE", webhook_attempts_key(sub), "0", str(count - 1))
        return [a for a in map(decode_attempt, raw) if a is not None]

    async def dead_letters(self, sub: str, count: int = 1000) -> list[DeadLetter]:
        out = []
        reply = await self.r.execute("XRANGE", webhook_dead_key(sub), "-", "+", "COUNT", str(count))
        for entry_id, flat in reply:
            it = iter(flat)
            g = {k.decode(): v for k, v in zip(it, it, strict=True)}
            out.append(DeadLetter(_s(entry_id), _s(g["batch"]), int(g["n"]), int(g["tries"]),
                                  _s(g["error"]), _s(g["url"]), g["body"]))
        return out

    async def requeue(self, sub: str, letter: DeadLetter, now_ms: int) -> bool:
        keys = [webhook_dead_key(sub), webhook_due_key(sub), webhook_batch_key(sub, letter.batch)]
        return bool(await self._eval(REQUEUE, keys, [letter.entry, str(now_ms)]))

    async def pending(self, sub: str) -> tuple[int, float | None]:
        """(batches waiting, the earliest one's due time in unix seconds)."""
        n = await self.r.execute("ZCARD", webhook_due_key(sub))
        first = await self.r.execute("ZRANGE", webhook_due_key(sub), "0", "0", "WITHSCORES")
        return int(n), (float(first[1]) / 1000 if first else None)
