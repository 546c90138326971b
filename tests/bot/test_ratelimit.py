"""Token buckets per user and per guild, with a small queue (injectable clock)."""

from __future__ import annotations

import pytest

from kotonoha_bot.bot.ratelimit import IDLE_FORGET_SECONDS, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_burst_then_queue_then_refusal(clock: Clock) -> None:
    limiter = RateLimiter(user_per_minute=6, guild_per_minute=100, queue=2, clock=clock)
    decisions = [limiter.acquire(1, 10) for _ in range(9)]
    assert [d.allowed for d in decisions] == [True] * 8 + [False]
    assert [d.wait for d in decisions[:6]] == [0.0] * 6
    # Queued messages wait for the tokens they reserved: 10 s per token at 6/min.
    assert decisions[6].wait == pytest.approx(10.0)
    assert decisions[7].wait == pytest.approx(20.0)
    refused = decisions[8]
    assert refused.scope == "user" and refused.notify
    assert refused.retry_after == pytest.approx(10.0)


def test_refusal_is_told_once_per_period(clock: Clock) -> None:
    limiter = RateLimiter(user_per_minute=1, guild_per_minute=100, queue=0, clock=clock)
    assert limiter.acquire(1, None).allowed
    first = limiter.acquire(1, None)
    second = limiter.acquire(1, None)
    assert not first.allowed and first.notify
    assert not second.allowed and not second.notify
    clock.now += first.retry_after
    assert limiter.acquire(1, None).allowed


def test_tokens_refill_with_time(clock: Clock) -> None:
    limiter = RateLimiter(user_per_minute=6, guild_per_minute=100, queue=0, clock=clock)
    for _ in range(6):
        assert limiter.acquire(1, 10).allowed
    assert not limiter.acquire(1, 10).allowed
    clock.now += 9.9
    assert not limiter.acquire(1, 10).allowed
    clock.now += 0.2
    assert limiter.acquire(1, 10).allowed


def test_users_are_independent_but_share_the_guild_bucket(clock: Clock) -> None:
    limiter = RateLimiter(user_per_minute=2, guild_per_minute=3, queue=0, clock=clock)
    assert limiter.acquire(1, 10).allowed
    assert limiter.acquire(1, 10).allowed
    assert not limiter.acquire(1, 10).allowed  # user 1 is out
    assert limiter.acquire(2, 10).allowed  # user 2 still has tokens; guild now empty
    refused = limiter.acquire(3, 10)
    assert not refused.allowed and refused.scope == "guild"
    assert limiter.acquire(3, 20).allowed  # another guild is unaffected
    assert limiter.acquire(4, None).allowed  # a DM has no guild bucket


def test_a_refused_message_takes_no_token(clock: Clock) -> None:
    limiter = RateLimiter(user_per_minute=2, guild_per_minute=1, queue=0, clock=clock)
    assert limiter.acquire(1, 10).allowed
    assert not limiter.acquire(1, 10).allowed  # refused by the guild...
    assert limiter.acquire(1, 20).allowed  # ...so user 1 still has its second token


def test_idle_buckets_are_forgotten(clock: Clock) -> None:
    limiter = RateLimiter(user_per_minute=6, guild_per_minute=30, clock=clock)
    for user in range(50):
        assert limiter.acquire(user, None).allowed
    assert len(limiter.users) == 50
    clock.now += IDLE_FORGET_SECONDS + 1
    limiter.acquire(999, None)
    assert len(limiter.users) == 1
