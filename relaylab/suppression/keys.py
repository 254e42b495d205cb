"""Redis key schema of the suppression lists and of the per-subaccount event log.

Every key starts with "rl:" and carries a Redis Cluster hash tag, so that all keys of one
subaccount live in one slot (a MULTI or Lua script over them stays legal in a cluster).

=============================  ======  =====================================  ==================
Key                            Type    Content                                TTL
=============================  ======  =====================================  ==================
rl:{sub:NAME}:bl               hash    blacklist of subaccount NAME:          none: entries live
                                       field "a:<address>" or "d:<domain>"    until removed; an
                                       -> Entry JSON (model.Entry.to_bytes)   entry's own expiry
                                                                              is checked on read
rl:{sub:NAME}:wl               hash    whitelist of subaccount NAME, same     none (as above)
                                       layout
rl:{global}:bl                 hash    blacklist for every subaccount         none (as above)
rl:{global}:wl                 hash    whitelist for every subaccount         none (as above)
rl:{sub:NAME}:events           stream  activity log: one entry per event      none; trimmed on
                                       (field "type" = injected, dropped,     every XADD to the
                                       ...; plus event fields)                plan's retention
                                                                              (MINID ~, days)
rl:{sub:NAME}:daily:YYYYMMDD   hash    event type -> count for that UTC day   none: aggregate
                                                                              statistics are kept
                                                                              indefinitely
rl:{sub:NAME}:hourly:          hash    event type -> count for that UTC hour  none (as daily)
  YYYYMMDDHH
rl:{sub:NAME}:uniq:TYPE:       HyperLogLog  distinct "message_id recipient"   none (as daily)
  YYYYMMDD[HH]                         pairs with an open/click that day/hour
rl:{q}:QUEUEID                 string  the milter's note on an accepted       6 days (Postfix's
                                       message for relaylab logd (relaylab/   default maximal
                                       events/note.py): subaccount, message   queue lifetime is
                                       id, tags, sender, recipients; one slot 5); logd deletes it
                                       for all, so logd reads a batch's notes once Postfix logs
                                       with one script call                   "removed"
rl:{q}:m:MESSAGEID             string  the same note by Relaylab message id,  7 days
                                       for `relaylab bounces` (reports come
                                       back days later); written only with
                                       bounces.domain set
rl:{sub:NAME}:logd:LOGD        string  position (see logd/follow.py) of the   none
                                       last log line whose events logd LOGD
                                       (logd.name, one per mail host) wrote
                                       for NAME; written in the same script
                                       as those events
rl:{sub:NAME}:bounces          hash    "h:<address>" -> hard bounces so far;  none; a field is
                                       "s:<address>" -> soft bounce times     deleted when the
                                       (epoch s, space-separated, last D      address is
                                       days) for automatic suppression        blacklisted
rl:{logd}:checkpoint:NAME      hash    logd NAME's place in the log: file     none
                                       dev/inode, offset, generation, the
                                       first bytes of the file
rl:{sub:NAME}:wh:cursor        string  relaylab webhooks' place in NAME's     none
                                       events stream: the id of the last
                                       entry it made into batches (written in
                                       the same script as those batches)
rl:{sub:NAME}:wh:due           zset    webhook batches to send: member =      none; a member
                                       batch id, score = when (unix ms); a    goes when its
                                       batch being sent is pushed past the    batch is sent or
                                       request's timeout (lease)              dead-lettered
rl:{sub:NAME}:wh:b:BATCHID     hash    one webhook batch: body (the JSON      none; deleted
                                       array sent, byte for byte every        once delivered
                                       time), n events, stage (primary |      or dead-lettered
                                       backup), fails (in this stage), tries,
                                       kind (live | replay), created (ms),
                                       error (the last failure)
rl:{sub:NAME}:wh:dead          stream  dead letters: batches whose retries    trimmed to the
                                       to the URL and backup URL ran out      plan's retention
                                       (batch, body, n, tries, error, url)    (MINID ~)
rl:{sub:NAME}:wh:attempts      list    the last 50 webhook delivery attempts, EXPIRE the plan's
                                       newest first, each JSON {t (unix s),   retention, set
                                       b (batch), n (events), g (primary |    again on every
                                       backup), u (URL), s (HTTP status or    attempt
                                       null), e (error), d (ms), o (outcome),
                                       k (try)}; pushed and trimmed (LTRIM)
                                       in the script that settles the batch
                                       (relaylab/webhook_attempts.py)
rl:{sub:NAME}:templates        hash    send API templates (add_template):     none; at most
                                       field = template id (32 hex) -> JSON   api/template_store
                                       {html, text, created}                  .MAX_TEMPLATES per
                                                                              subaccount
rl:{sub:NAME}:ix:pos           string  relaylab api's index: id of the last   none
                                       events stream entry it indexed
rl:{sub:NAME}:ix:t:TYPE        zset    activity index by event type: member   EXPIRE retention;
rl:{sub:NAME}:ix:r:RECIPIENT           = stream id (seq zero-padded to 10),   entries older than
rl:{sub:NAME}:ix:m:MESSAGEID           score = its ms; by lower-cased         retention removed
rl:{sub:NAME}:ix:g:TAG                 recipient, message id, tag             on every write
rl:{sub:NAME}:ix:gc:TAG:DAY    hash    event type -> count of TAG's events    EXPIRE retention
                                       on DAY (days since 1970, UTC)          + 1 day
rl:{sub:NAME}:ix:tags          zset    tags seen -> last ms seen              as ix:t
rl:{sub:NAME}:ix:rows          hash    ix:t member -> the event's row as the  EXPIRE retention;
                                       API returns it (JSON)                  old rows removed
                                                                              with ix:t entries
rl:{ui}:secret                 string  the dashboard's cookie signing key      none; deleting it
                                       (api/ui/session.py), made by the       ends every session
                                       first worker that needs it
rl:{ui}:s:TOKEN                string  one dashboard session: JSON {key,      8 hours
                                       fp, csrf, created} (the API client's   (SESSION_SECONDS)
                                       app key, its secret hash's
                                       fingerprint, the CSRF token)
=============================  ======  =====================================  ==================

One hash per list (rather than one key per entry) keeps a 1,000,000-entry list at a
single key that HMGET reads in O(1) per field, HSCAN exports with constant memory, and
DEL removes at once.
"""

from __future__ import annotations

import re
import time

from relaylab.suppression.model import GLOBAL, ListKind, Scope

__all__ = [
    "activity_index_prefix",
    "bounces_key",
    "checkpoint_key",
    "daily_key",
    "events_key",
    "events_minid",
    "hourly_key",
    "list_key",
    "logd_position_key",
    "queue_key",
    "scope_tag",
    "templates_key",
    "unique_key",
    "webhook_attempts_key",
    "webhook_batch_key",
    "webhook_cursor_key",
    "webhook_dead_key",
    "webhook_due_key",
]

# Same rule as the policy loader: hash-tag braces can never appear in a name.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def scope_tag(scope: Scope) -> str:
    if scope is GLOBAL:
        return "{global}"
    if not _NAME_RE.match(scope):
        raise ValueError(f"not a valid subaccount name: {scope!r}")
    return f"{{sub:{scope}}}"


def list_key(scope: Scope, which: ListKind) -> str:
    return f"rl:{scope_tag(scope)}:{which.value}"


def events_key(subaccount: str) -> str:
    return f"rl:{scope_tag(subaccount)}:events"


def events_minid(now: float, retention_days: int) -> int:
    """XADD's MINID (ms) that trims the events stream to `retention_days` before `now`."""
    return int((now - retention_days * 86_400) * 1000)


def daily_key(subaccount: str, now: float) -> str:
    """Counter hash for the UTC day containing `now` (epoch seconds)."""
    return f"rl:{scope_tag(subaccount)}:daily:{time.strftime('%Y%m%d', time.gmtime(now))}"


def hourly_key(subaccount: str, now: float) -> str:
    """Counter hash for the UTC hour containing `now`."""
    return f"rl:{scope_tag(subaccount)}:hourly:{time.strftime('%Y%m%d%H', time.gmtime(now))}"


def unique_key(subaccount: str, event_type: str, now: float, *, hourly: bool) -> str:
    """HyperLogLog of the distinct (message, recipient) pairs with an `event_type` event
    in the UTC day (or hour) containing `now`."""
    fmt = "%Y%m%d%H" if hourly else "%Y%m%d"
    return f"rl:{scope_tag(subaccount)}:uniq:{event_type}:{time.strftime(fmt, time.gmtime(now))}"


_QUEUE_ID_RE = re.compile(r"[0-9A-Za-z]{5,32}\Z")


def queue_key(queue_id: str) -> str:
    """The milter's note on an accepted message, for relaylab logd. Every note shares the
    hash tag {q}: logd reads a batch's notes with one script call (legal in a cluster too)."""
    if not _QUEUE_ID_RE.match(queue_id):
        raise ValueError(f"not a Postfix queue id: {queue_id!r}")
    return f"rl:{{q}}:{queue_id}"


def logd_position_key(subaccount: str, logd: str = "main") -> str:
    """Where logd `logd` (logd.name: one per mail host) has written NAME's events up to."""
    if not _NAME_RE.match(logd):
        raise ValueError(f"not a valid logd name: {logd!r}")
    return f"rl:{scope_tag(subaccount)}:logd:{logd}"


def bounces_key(subaccount: str) -> str:
    return f"rl:{scope_tag(subaccount)}:bounces"


def checkpoint_key(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"not a valid logd name: {name!r}")
    return f"rl:{{logd}}:checkpoint:{name}"


def activity_index_prefix(subaccount: str) -> str:
    """Prefix of relaylab api's activity index keys of the subaccount (api/activity.py
    builds the rest inside its scripts: same hash tag, same slot)."""
    return f"rl:{scope_tag(subaccount)}:ix:"


def webhook_cursor_key(subaccount: str) -> str:
    return f"rl:{scope_tag(subaccount)}:wh:cursor"


def webhook_due_key(subaccount: str) -> str:
    return f"rl:{scope_tag(subaccount)}:wh:due"


_BATCH_ID_RE = re.compile(r"msg_[A-Za-z0-9]{1,64}\Z")


def webhook_batch_key(subaccount: str, batch_id: str) -> str:
    if not _BATCH_ID_RE.match(batch_id):
        raise ValueError(f"not a webhook batch id: {batch_id!r}")
    return f"rl:{scope_tag(subaccount)}:wh:b:{batch_id}"


def webhook_dead_key(subaccount: str) -> str:
    return f"rl:{scope_tag(subaccount)}:wh:dead"


def webhook_attempts_key(subaccount: str) -> str:
    return f"rl:{scope_tag(subaccount)}:wh:attempts"


_MESSAGE_ID_RE = re.compile(r"[0-9a-f]{32}\Z")


def message_key(message_id: str) -> str:
    """The note by Relaylab message id, for asynchronous bounces (relaylab bounces)."""
    if not _MESSAGE_ID_RE.match(message_id):
        raise ValueError(f"not a Relaylab message id: {message_id!r}")
    return f"rl:{{q}}:m:{message_id}"


def templates_key(subaccount: str) -> str:
    """The send API's templates of a subaccount (api/template_store.py)."""
    return f"rl:{scope_tag(subaccount)}:templates"
