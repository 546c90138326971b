"""Per-user and per-guild token buckets with a small queue.

Each bucket holds up to ``per_minute`` tokens and refills at ``per_minute`` per
minute. A message takes one token from its user's bucket and one from its guild's.
When a bucket is empty, up to ``queue`` further messages may still be accepted:
they *reserve* a future token (the bucket goes negative) and wait until it is
refilled, so a short burst is answered a little later instead of refused. Beyond
that the message is refused, and the user is told (once per refusal period, so a
flood does not make the bot flood back). A refused message takes no token from
either bucket. The clock is injectable for tests; nothing here sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

#: Messages that may wait for a token per bucket, beyond the bucket's capacity.
DEFAULT_QUEUE = 2
#: Buckets untouched this long are full again and forgotten (memory stays bounded).
IDLE_FORGET_SECONDS = 600.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer for one message."""

    allowed: bool
    wait: float = 0.0
    """Seconds to wait before answering (a queued message); 0 = at once."""
    retry_after: float = 0.0
    """When refused: seconds until a message would be accepted again."""
    scope: Literal["user", "guild"] | None = None
    """Which bucket refused it."""
    notify: bool = False
    """When refused: whether to tell the user (first refusal of a period)."""


class TokenBuckets:
    """Many buckets (one per key) sharing a rate, capacity and queue length."""

    def __init__(self, per_minute: int, *, queue: int, clock: Callable[[], float]) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.queue = queue
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}

    def _level(self, key: int, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.capacity
        return min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)

    def check(self, key: int, now: float) -> tuple[bool, float, float]:
        """(accepted, wait if accepted, retry_after if refused) without taking a token."""
        level = self._level(key, now)
        after = level - 1.0
        if after >= -self.queue:
            return True, max(0.0, -after / self.rate), 0.0
        return False, 0.0, (-self.queue - after) / self.rate

    def take(self, key: int, now: float) -> None:
        """Take one token (possibly reserving a future one)."""
        self._buckets[key] = _Bucket(self._level(key, now) - 1.0, now)

    def forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled completely."""
        full = [k for k in self._buckets if self._level(k, now) >= self.capacity]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimiter:
    """The user and guild limits together (DMs only have the user limit)."""

    def __init__(
        self,
        *,
        user_per_minute: int,
        guild_per_minute: int,
        queue: int = DEFAULT_QUEUE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.users = TokenBuckets(user_per_minute, queue=queue, clock=clock)
        self.guilds = TokenBuckets(guild_per_minute, queue=queue, clock=clock)
        self._told_until: dict[int, float] = {}
        self._last_cleanup = clock()

    def acquire(self, user_id: int, guild_id: int | None) -> Decision:
        """Decide for one message; an accepted one has taken its tokens."""
        now = self._clock()
        self._cleanup(now)
        ok_user, wait_user, retry_user = self.users.check(user_id, now)
        ok_guild, wait_guild, retry_guild = (
            self.guilds.check(guild_id, now) if guild_id is not None else (True, 0.0, 0.0)
        )
        if ok_user and ok_guild:
            self.users.take(user_id, now)
            if guild_id is not None:
                self.guilds.take(guild_id, now)
            return Decision(True, wait=max(wait_user, wait_guild))
        scope: Literal["user", "guild"] = "user" if not ok_user else "guild"
        retry = max(retry_user if not ok_user else 0.0, retry_guild if not ok_guild else 0.0)
        notify = now >= self._told_until.get(user_id, float("-inf"))
        if notify:
            self._told_until[user_id] = now + retry
        return Decision(False, retry_after=retry, scope=scope, notify=notify)

    def _cleanup(self, now: float) -> None:
        if now - self._last_cleanup < IDLE_FORGET_SECONDS:
            return
        self._last_cleanup = now
        self.users.forget_idle(now)
        self.guilds.forget_idle(now)
        self._told_until = {k: v for k, v in self._told_until.items() if v > now}
