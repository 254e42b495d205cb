"""`relaylab logd`: follow Postfix's log, write delivery events, save the place.

One loop, one thread: read the new whole lines (logd/follow.py), find the delivery,
expiry and removal records in them (relaylab/events/postfix_log.py), fetch the milter's
notes for queue ids not seen yet (one pipelined round trip), turn records into events
(logd/events.py), write them per subaccount (relaylab/events/apply.py), then save the checkpoint
and delete the notes of queue ids Postfix removed. Redis unavailable: the batch is
retried until it is written (nothing is skipped; logd just falls behind), with one log
line per outage.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Iterator
from itertools import compress, groupby, repeat
from pathlib import Path
from types import FrameType
from typing import TypeVar

import attrs

from logd.events import Builder, Found, NoteInfo, note_info
from logd.follow import CHUNK, Checkpoint, LogFollower, position
from logd.redisconn import sync_resp
from relaylab.events.apply import LOGD_APPLY, Applied, Calls, SubaccountPlan, applied
from relaylab.limits.lua import Script
from relaylab.logfmt import log_event
from relaylab.metrics import metrics
from relaylab.policy.model import Policy
from relaylab.policy.reloader import PolicyHolder, file_stamp, trigger_path
from relaylab.resp import RedisReplyError, RedisUnavailable, encode_command
from relaylab.suppression.keys import checkpoint_key, queue_key

NOTE_PREFIX = queue_key("XXXXX")[:-5]  # rl:{q}:
_PREFIX = NOTE_PREFIX.encode()
_PREFIX_LEN = len(_PREFIX)
# The notes of KEYS, one per line ("" for none): notes have no newlines (note.py), and one
# string is much cheaper to read than an array of as many.
NOTES = Script("logd_notes", """
local out, n = {}, #KEYS
for i = 1, n, 4000 do  -- MGET in slices (unpack's limit)
  local got = redis.call('MGET', unpack(KEYS, i, math.min(i + 3999, n)))
  for k = 1, #got do out[i + k - 1] = got[k] or '' end
end
return table.concat(out, '\\n')
""")

__all__ = ["Logd", "Stats"]


def _keys(queue_ids: list[bytes]) -> bytes:
    """The notes' keys of the queue ids, as RESP bulk strings: each run of queue ids of
    one length in one bytes.join (a batch has thousands, Postfix's are of one or two
    lengths)."""
    out = []
    for size, run in groupby(queue_ids, len):
        sep = b"\r\n$%d\r\n%b" % (size + _PREFIX_LEN, _PREFIX)
        out.append(sep[2:] + sep.join(run) + b"\r\n")
    return b"".join(out)

log = logging.getLogger("relaylab.logd")
T = TypeVar("T")

IDLE_POLL = 0.1  # seconds between looks at a log with nothing new
NOTE_CACHE = 100_000  # queue ids whose note (or its absence) is remembered
RETRY = 1.0  # seconds between attempts while Redis is unavailable
STATS_EVERY = 60.0  # seconds between two event=progress lines


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside a batch: a batch makes some 10,000 objects
    (matches, tuples) that live until its end, and the collector would walk them again and
    again (~15 % of logd's time, bench/logd); freed by their reference counts at the end of
    the batch, they never reach it. Reference cycles (there are none per batch) would be
    collected as usual afterwards."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@attrs.frozen
class _Notes:
    queue_ids: list[bytes]
    command: bytes  # NOTES for them, encoded
    sent: bool  # and not answered yet


@attrs.frozen
class _Next:
    found: Found
    base: int  # the log position of its first byte
    checkpoint: Checkpoint  # where the log is read to once it is written
    notes: _Notes | None  # asked for
    read_at: float  # time.monotonic() when its lines were read


@attrs.frozen
class _Inflight:
    calls: Calls
    checkpoint: Checkpoint  # where the log is read to once these are written
    removed: list[bytes]  # queue ids Postfix removed in the batch
    read_at: float = 0.0  # time.monotonic() when its lines were read
    lines: int = 0


@attrs.define
class Stats:
    lines: int = 0
    records: int = 0
    bad: int = 0
    events: int = 0
    skipped: int = 0  # events already written before a restart
    uncorrelated: int = 0
    blocked: int = 0
    batches: int = 0


class Logd:
    def __init__(self, holder: PolicyHolder | None, redis_url: str, log_file: Path, name: str,
                 *, start_at: str = "end", chunk: int = CHUNK, rotate_grace: float = 1.0
                 ) -> None:
        self.holder = holder
        self.conn = sync_resp(redis_url)
        self.notes_conn = sync_resp(redis_url)  # answered while scripts run on conn
        self.follower = LogFollower(log_file, chunk=chunk, rotate_grace=rotate_grace)
        self.name = name
        self.start_at = start_at
        self.builder = Builder(name)
        self.notes: dict[bytes, NoteInfo | None] = {}  # oldest first
        self.stats = Stats()
        self._stop = False
        self._reload = False
        self._down_since: float | None = None
        self._policy_stamp = file_stamp(holder.path) if holder else None
        self._trigger_stamp = file_stamp(trigger_path(holder.path)) if holder else None
        self._next_policy_check = 0.0
        self._inflight: _Inflight | None = None
        self._unsent: list[bytes] | None = None  # checkpoint commands not sent yet
        self._saving: list[bytes] | None = None  # checkpoint commands sent, not answered yet
        self._next: _Next | None = None  # read ahead

    # -- lifecycle -----------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._stop = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda s, f: self.stop())
        signal.signal(signal.SIGINT, lambda s, f: self.stop())
        signal.signal(signal.SIGHUP, self._on_hup)

    def start(self) -> None:
        cp = self._redis(lambda: self._load_checkpoint())
        self.follower.start(cp, at_end=self.start_at == "end")
        log_event(log, "started", file=str(self.follower.path), name=self.name,
                  offset=self.follower.offset, generation=self.follower.generation,
                  resumed=cp is not None)
        metrics().up.set(1)

    def _load_checkpoint(self) -> Checkpoint | None:
        reply = self.conn.execute("HGETALL", checkpoint_key(self.name))
        fields = dict(zip(reply[::2], reply[1::2], strict=True))
        return Checkpoint.from_fields(fields) if fields else None

    def run(self, *, until_idle: bool = False) -> None:
        """Follow until stop() (or, with until_idle, until the log has nothing new)."""
        last_stats = time.monotonic()
        while not self._stop:
            self._check_policy()
            with _gc_paused():
                busy = self.step()
            if not busy:
                if until_idle:
                    return
                time.sleep(IDLE_POLL)
            if time.monotonic() - last_stats > STATS_EVERY:
                last_stats = time.monotonic()
                self.log_progress()
        self._finish()
        self._settle_save()
        self.log_progress()

    def log_progress(self) -> None:
        log_event(log, "progress", **attrs.asdict(self.stats), offset=self.follower.offset,
                  generation=self.follower.generation)

    # -- one batch -----------------------------------------------------------------------
    def step(self) -> bool:
        """Handle the next batch of whole lines; False if there was none.

        Pipelined, so that Redis works while this process does: a batch's notes are
        asked for (over a second connection) as soon as it is read and parsed, before the
        previous batch's scripts are sent; its scripts are sent once it is turned into
        events, and their replies read (then its checkpoint saved) only after the next
        batch has been read, parsed, its notes asked for, and turned into events. The
        checkpoint still follows the replies; its own replies are read with the next
        batch's (a checkpoint not answered before a crash is an older one: the lines
        after it are read again, their events skipped by their positions)."""
        cur = self._next
        self._next = None
        if cur is None:
            cur = self._prepare()
            if cur is None:
                self._finish()
                self._settle_save()
                return False
        self._collect_notes(cur.notes)
        self._next = self._prepare()  # read ahead: its notes come while Redis works on
        batch = self.builder.build(cur.found, cur.base, self.notes.get)
        self._finish()
        self.stats.lines += batch.lines
        self.stats.bad += batch.bad
        self.stats.records += batch.records
        self.stats.uncorrelated += batch.uncorrelated
        for sample in batch.bad_samples[:1]:
            log_event(log, "bad_line", logging.DEBUG, line=sample.decode("utf-8", "replace"))
        calls: Calls = []
        if batch.subs:
            policy = self._policy()
            calls = batch.calls({sub: SubaccountPlan.of(policy, sub) for sub in batch.subs},
                                time.time())
        scripts = [c for _, c in calls]
        save, self._unsent = self._unsent, None
        if calls:  # the previous batch's checkpoint in the same write: one connection
            self._redis(lambda: self.conn.evalsha_send(LOGD_APPLY, scripts, before=save))
        elif save:
            self._redis(lambda: self.conn.send(save))
        self._saving = save
        self._inflight = _Inflight(calls, cur.checkpoint, batch.removed, cur.read_at,
                                   batch.lines)
        self.stats.batches += 1
        return True

    def _prepare(self) -> _Next | None:
        """The next whole lines read and parsed, the notes they need asked for."""
        got = self.follower.read()
        if got is None:
            return None
        read_at = time.monotonic()
        data, end, generation, offset = got
        found = self.builder.find(data, end)
        self.follower.advance(end)
        return _Next(found, position(generation, offset), self.follower.checkpoint,
                     self._ask_notes(found.queue_ids), read_at)

    def _finish(self) -> None:
        """The replies of the batch in flight (after those of the previous checkpoint),
        then its checkpoint sent."""
        fl = self._inflight
        if fl is None:
            return
        scripts = [c for _, c in fl.calls]
        first = [True]

        def attempt() -> Applied:
            if first[0]:
                first[0] = False
                self._saved(again=False)
                if not scripts:
                    return Applied()
                return applied(fl.calls, self.conn.evalsha_receive(LOGD_APPLY, scripts,
                                                                   len(scripts)))
            self._saved(again=True)  # on a new connection: both sent again
            if not scripts:
                return Applied()
            return applied(fl.calls, self.conn.evalsha_all(LOGD_APPLY, scripts))

        result = self._redis(attempt)
        self.stats.events += result.written
        self.stats.skipped += result.skipped
        for sub, address in result.blocked:
            self.stats.blocked += 1
            log_event(log, "blacklisted", subaccount=sub, address=address, reason="hardbounce",
                      source="bounce")
        self._save(fl.checkpoint, fl.removed)
        self._inflight = None
        m = metrics()
        m.logd_lines.inc(fl.lines)
        m.logd_events.inc(result.written)
        m.logd_lag.set(time.monotonic() - fl.read_at)

    def _policy(self) -> Policy | None:
        return self.holder.policy if self.holder is not None else None

    def _ask_notes(self, queue_ids: set[bytes]) -> _Notes | None:
        """Ask for the notes of queue ids not seen yet: one script (every note has the
        hash tag {q}) answering them all in one string, one per line. Not waited for."""
        notes = self.notes
        missing = [q for q in queue_ids if q not in notes]
        if not missing:
            return None
        missing.sort(key=len)  # for _keys
        # The parser only returns queue ids queue_key() accepts: the keys are built here.
        n = b"%d" % len(missing)
        command = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$%d\r\n%b\r\n%b" % (
            len(missing) + 3, NOTES.sha.encode(), len(n), n, _keys(missing))
        try:
            self.notes_conn.send([command])
            sent = True
        except RedisUnavailable:
            sent = False  # asked again when collected
        return _Notes(missing, command, sent)

    def _collect_notes(self, asked: _Notes | None) -> None:
        if asked is None:
            return
        first = [asked.sent]

        def attempt() -> list[bytes]:
            conn = self.notes_conn
            if first[0]:
                first[0] = False
                reply = conn.receive(1)[0]
            else:
                reply = conn.execute_all([asked.command])[0]
            if isinstance(reply, RedisReplyError) and str(reply).startswith("NOSCRIPT"):
                conn.load_script(NOTES)
                reply = conn.execute_all([asked.command])[0]
            if isinstance(reply, RedisReplyError):
                raise reply
            raws: list[bytes] = reply.split(b"\n")
            if len(raws) != len(asked.queue_ids):  # a note with a newline after all: MGET
                raws = [raw or b"" for raw in conn.execute(
                    "MGET", *(_PREFIX + q for q in asked.queue_ids))]
            return raws

        raws = self._redis(attempt)
        notes = self.notes
        # (note_info() of an empty string, no note, is None; the loop in C)
        notes.update(zip(asked.queue_ids, map(note_info, asked.queue_ids, raws), strict=True))
        if len(notes) > NOTE_CACHE:
            for q in list(notes)[:len(notes) - NOTE_CACHE]:
                del notes[q]

    def _save(self, cp: Checkpoint, removed: list[bytes]) -> None:
        cmds = [encode_command(["HSET", checkpoint_key(self.name),
                                *(x for kv in cp.to_fields().items() for x in kv)])]
        # A removed message's note is of no more use once the checkpoint is past its
        # removal: a restart never re-reads its lines.
        # (known to have none: popped as None, falsy; the others are truthy)
        gone = list(compress(removed, map(self.notes.pop, removed, repeat("unknown"))))
        self.builder.forget_all(removed)
        if gone:
            cmds.append(b"*%d\r\n$6\r\nUNLINK\r\n%b" % (len(gone) + 1, _keys(gone)))
        # Sent with the next batch's scripts, in the same write, its replies read before
        # theirs (_finish); or at once if logd is idle or stops (_settle_save).
        self._unsent = cmds

    def _saved(self, *, again: bool) -> None:
        """The replies to the checkpoint commands sent (again: send them again first, the
        connection having failed since)."""
        cmds = self._saving
        if cmds is None:
            return
        if again:
            self.conn.execute_all(cmds)
        else:
            self.conn.receive(len(cmds))
        self._saving = None

    def _settle_save(self) -> None:
        """The checkpoint saved and answered (logd is idle or stops)."""
        if self._unsent is not None:
            self._saving, self._unsent = self._unsent, None
            again = [True]  # not sent yet
        else:
            again = [False]

        def attempt() -> None:
            self._saved(again=again[0])
            again[0] = True
        self._redis(attempt)

    def _redis(self, work: Callable[[], T]) -> T:
        """Run `work` (Redis commands), retrying while Redis is unavailable."""
        while True:
            try:
                result = work()
            except (RedisUnavailable, RedisReplyError, OSError) as e:
                metrics().redis_errors.inc()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    metrics().redis_down.set(1)
                    log_event(log, "redis_unavailable", logging.ERROR, detail=str(e),
                              effect="retrying; the log is read on once Redis answers")
                if self._stop:
                    raise
                time.sleep(RETRY)
                continue
            if self._down_since is not None:
                outage = time.monotonic() - self._down_since
                log_event(log, "redis_recovered", outage_s=round(outage, 1))
                metrics().redis_outage_seconds.inc(outage)
                metrics().redis_down.set(0)
                self._down_since = None
            return result

    def _check_policy(self) -> None:
        if self.holder is None:
            return
        if self._reload:
            self._reload = False
            self.holder.reload("sighup")
            return
        now = time.monotonic()
        if now < self._next_policy_check:
            return
        self._next_policy_check = now + 1.0
        trig = file_stamp(trigger_path(self.holder.path))
        stamp = file_stamp(self.holder.path)
        if trig != self._trigger_stamp:
            self._trigger_stamp = trig
            self._policy_stamp = stamp
            self.holder.reload("relaylab reload")
        elif stamp != self._policy_stamp:
            self._policy_stamp = stamp
            self.holder.reload("file changed")

    def close(self) -> None:
        self.follower.close()
        self.conn.close()
        self.notes_conn.close()
