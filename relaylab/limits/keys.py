"""The Redis key schema of the limits, in one place.

Every key of a subaccount carries the same hash tag, ``{sub:NAME}``, so that every script
touches a single Redis Cluster slot. Subaccount names are ``[A-Za-z0-9._-]`` (checked by
the policy loader), so they never contain the braces of a hash tag.

=====================================  ======  ============================================
key                                    type    content, lifetime
=====================================  ======  ============================================
``rl:{sub:N}:win``                     hash    sliding hour: field = minute number (unix
                                               seconds // 60) -> recipients counted in
                                               that minute; ``t`` = sum of the live
                                               buckets; ``h`` = oldest live minute.
                                               TTL 62 min after the last write.
``rl:{sub:N}:sess``                    zset    open SMTP sessions: member = session id
                                               (see sessions.py), score = expiry in unix
                                               ms. TTL = session_ttl after the last write.
``rl:{sub:N}:own``                     hash    who holds each open session's milter
                                               connection: field = session id -> lease id
                                               of that milter worker (leases.py). TTL 1 day
                                               after the last write.
``rl:{sub:N}:use:h:YYYYMMDD``          hash    usage per hour of that UTC day: field
                                               ``HH``. TTL 410 days after the last write.
``rl:{sub:N}:use:d:YYYYMM``            hash    usage per day of that UTC month: field
                                               ``DD``. TTL 410 days after the last write.
``rl:{sub:N}:rcpt:QUEUEID``            string  what policyd counted for that message at
                                               END-OF-DATA (see refund.py), so that a
                                               refusal at end of message can give it back.
                                               TTL 1 hour. After the milter's end of message
                                               it reads ``confirmed`` (nothing to give back).
``rl:{sub:N}:pend``                    hash    counts awaiting the milter's end of message:
                                               field = queue id -> lease id of the worker
                                               that will answer it; refunded if that lease
                                               dies first. TTL 1 hour after the last write.
``rl:{sub:N}:use:m``                   hash    usage per UTC month: field ``YYYYMM``; also
                                               the monthly-quota counter. No TTL: aggregate
                                               statistics are kept for good (12 fields a
                                               year).
``rl:leases``                          zset    milter worker leases: member = lease id,
                                               score = last heartbeat (Redis server time,
                                               ms). One key for all subaccounts: only read
                                               and written on its own.
``rl:lease:L:subs``                    set     subaccounts in which lease L owns sessions
                                               (where to look when L dies). TTL 1 day after
                                               the last write.
=====================================  ======  ============================================
"""

from __future__ import annotations

import time

import attrs

PREFIX = "rl"
USAGE_TTL_SECONDS = 410 * 86400  # hours and days kept for at least 400 days
WINDOW_TTL_SECONDS = 62 * 60  # the window spans 61 one-minute buckets


def tag(subaccount: str) -> str:
    """The Redis Cluster hash tag shared by every key of one subaccount."""
    return "{sub:" + subaccount + "}"


def window_key(subaccount: str) -> str:
    return f"{PREFIX}:{tag(subaccount)}:win"


def sessions_key(subaccount: str) -> str:
    return f"{PREFIX}:{tag(subaccount)}:sess"


def receipt_key(subaccount: str, queue_id: str) -> str:
    return f"{PREFIX}:{tag(subaccount)}:rcpt:{queue_id}"


def owners_key(subaccount: str) -> str:
    return f"{PREFIX}:{tag(subaccount)}:own"


def pending_key(subaccount: str) -> str:
    return f"{PREFIX}:{tag(subaccount)}:pend"


LEASES_KEY = f"{PREFIX}:leases"


def lease_subaccounts_key(lease: str) -> str:
    return f"{PREFIX}:lease:{lease}:subs"


def month_usage_key(subaccount: str) -> str:
    return f"{PREFIX}:{tag(subaccount)}:use:m"


@attrs.frozen
class UsageKeys:
    """The usage-counter keys and fields for one instant (UTC calendar of the mail host)."""

    hour_key: str
    hour_field: str
    day_key: str
    day_field: str
    month_key: str
    month_field: str

    @classmethod
    def at(cls, subaccount: str, unix_time: float) -> UsageKeys:
        t = time.gmtime(unix_time)
        base = f"{PREFIX}:{tag(subaccount)}:use"
        return cls(
            hour_key=f"{base}:h:{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}",
            hour_field=f"{t.tm_hour:02d}",
            day_key=f"{base}:d:{t.tm_year:04d}{t.tm_mon:02d}",
            day_field=f"{t.tm_mday:02d}",
            month_key=month_usage_key(subaccount),
            month_field=f"{t.tm_year:04d}{t.tm_mon:02d}",
        )
