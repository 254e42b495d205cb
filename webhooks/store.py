"""Webhook state in Redis (keys: relaylab/suppression/keys.py, all in the subaccount's slot).

- The cursor is the id of the last events-stream entry made into batches. New batches and
  the cursor's move are written by one script that first checks the cursor is still where
  the batches were read from: a restart (or a second instance) never makes an event into
  two batches, and never skips one.
- A batch waits in the due set (score = when to send, unix ms). Taking it to send pushes
  its score past the request's timeout (a lease): a service killed mid-request leaves it
  there, and it is sent again once the lease runs out (at least once).
- After an attempt the batch is deleted (delivered), rescheduled, or moved to the
  dead-letter stream, each by one script.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import redis.asyncio as aioredis

from relaylab.suppression.keys import (
    events_key,
    webhook_batch_key,
    webhook_cursor_key,
    webhook_dead_key,
    webhook_due_key,
)
from webhooks.decide import Batch, Stage

__all__ = ["BatchState", "DeadLetter", "Store"]

ENQUEUE = """
if ARGV[1] ~= '*' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 3, #KEYS do
  local j = 5 + (i - 3) * 3
  redis.call('HSET', KEYS[i], 'body', ARGV[j + 1], 'n', ARGV[j + 2], 'kind', ARGV[4],
             'created', ARGV[3], 'stage', 'primary', 'fails', '0', 'tries', '0')
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[j])
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""

CLAIM = """
local ids = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return ids
"""

RESCHEDULE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'stage', ARGV[3], 'fails', ARGV[4], 'tries', ARGV[5], 'error', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

DEAD = """
local b = redis.call('HMGET', KEYS[1], 'body', 'n', 'kind', 'created')
if b[1] then
  redis.call('XADD', KEYS[3], 'MINID', '~', ARGV[2], '*', 'batch', ARGV[1], 'n', b[2],
             'kind', b[3], 'created', b[4], 'tries', ARGV[3], 'error', ARGV[4], 'url', ARGV[5],
             'body', b[1])
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return b[1] and 1 or 0
"""

REQUEUE = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local f = {}
for i = 1, #e[1][2], 2 do f[e[1][2][i]] = e[1][2][i + 1] end
redis.call('HSET', KEYS[3], 'body', f['body'], 'n', f['n'], 'kind', 'requeued',
           'created', ARGV[2], 'stage', 'primary', 'fails', '0', 'tries', '0')
redis.call('ZADD', KEYS[2], ARGV[2], f['batch'])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


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


class Store:
    def __init__(self, r: aioredis.Redis) -> None:
        # redis-py's annotations cover both reply decodings; this client never decodes.
        self.r: Any = r
        self._enqueue = r.register_script(ENQUEUE)
        self._claim = r.register_script(CLAIM)
        self._reschedule = r.register_script(RESCHEDULE)
        self._dead = r.register_script(DEAD)
        self._requeue = r.register_script(REQUEUE)

    async def cursor(self, sub: str) -> str:
        """Where this subaccount's batches continue; set on first use to the stream's last
        entry (events from before the webhook was configured are for `replay`)."""
        key = webhook_cursor_key(sub)
        cur = await self.r.get(key)
        if cur is not None:
            return _s(cur)
        last = await self.r.xrevrange(events_key(sub), "+", "-", count=1)
        await self.r.set(key, _s(last[0][0]) if last else "0-0", nx=True)
        return _s(await self.r.get(key))

    async def read_after(self, sub: str, cursor: str, count: int
                         ) -> list[tuple[str, dict[str, str]]]:
        entries = await self.r.xrange(events_key(sub), "(" + cursor, "+", count=count)
        return [(_s(i), {_s(k): _s(v) for k, v in f.items()}) for i, f in entries]

    async def read_range(self, sub: str, start: str, end: str, count: int
                         ) -> list[tuple[str, dict[str, str]]]:
        entries = await self.r.xrange(events_key(sub), start, end, count=count)
        return [(_s(i), {_s(k): _s(v) for k, v in f.items()}) for i, f in entries]

    async def enqueue(self, sub: str, batches: Sequence[Batch], *, expected: str, cursor: str,
                      now_ms: int, kind: str) -> bool:
        """Store the batches, due now, and move the cursor from `expected` to `cursor`
        ('*' / '': no check / no move). False: the cursor had moved, nothing written."""
        keys = [webhook_cursor_key(sub), webhook_due_key(sub),
                *(webhook_batch_key(sub, b.id) for b in batches)]
        args: list[str | bytes] = [expected, cursor, str(now_ms), kind]
        for b in batches:
            args += [b.id, b.body, str(b.count)]
        return bool(await self._enqueue(keys=keys, args=args))

    async def claim(self, sub: str, now_ms: int, lease_until_ms: int, limit: int) -> list[str]:
        ids = await self._claim(keys=[webhook_due_key(sub)],
                                args=[str(now_ms), str(lease_until_ms), str(limit)])
        return [_s(i) for i in ids]

    async def load(self, sub: str, batch_id: str) -> BatchState | None:
        v = await self.r.hmget(webhook_batch_key(sub, batch_id),
                               ["body", "n", "stage", "fails", "tries", "kind"])
        if v[0] is None:
            await self.r.zrem(webhook_due_key(sub), batch_id)
            return None
        return BatchState(batch_id, v[0], int(v[1] or 0), Stage(_s(v[2] or b"primary")),
                          int(v[3] or 0), int(v[4] or 0), _s(v[5] or b"live"))

    async def delivered(self, sub: str, batch_id: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(webhook_batch_key(sub, batch_id))
            p.zrem(webhook_due_key(sub), batch_id)
            await p.execute()

    async def reschedule(self, sub: str, batch_id: str, *, due_ms: int, stage: Stage, fails: int,
                         tries: int, error: str) -> None:
        await self._reschedule(keys=[webhook_batch_key(sub, batch_id), webhook_due_key(sub)],
                               args=[batch_id, str(due_ms), stage.value, str(fails), str(tries),
                                     error])

    async def dead(self, sub: str, batch_id: str, *, minid_ms: int, tries: int, error: str,
                   url: str) -> None:
        await self._dead(keys=[webhook_batch_key(sub, batch_id), webhook_due_key(sub),
                               webhook_dead_key(sub)],
                         args=[batch_id, str(minid_ms), str(tries), error, url])

    async def dead_letters(self, sub: str, count: int = 1000) -> list[DeadLetter]:
        out = []
        for i, f in await self.r.xrange(webhook_dead_key(sub), "-", "+", count=count):
            g = {_s(k): v for k, v in f.items()}
            out.append(DeadLetter(_s(i), _s(g["batch"]), int(g["n"]),
                                  int(g["tries"]), _s(g["error"]), _s(g["url"]), g["body"]))
        return out

    async def requeue(self, sub: str, letter: DeadLetter, now_ms: int) -> bool:
        keys = [webhook_dead_key(sub), webhook_due_key(sub), webhook_batch_key(sub, letter.batch)]
        return bool(await self._requeue(keys=keys, args=[letter.entry, str(now_ms)]))

    async def pending(self, sub: str) -> tuple[int, float | None]:
        """(batches waiting, the earliest one's due time in unix seconds)."""
        n = await self.r.zcard(webhook_due_key(sub))
        first = await self.r.zrange(webhook_due_key(sub), 0, 0, withscores=True)
        return int(n), (float(first[0][1]) / 1000 if first else None)
