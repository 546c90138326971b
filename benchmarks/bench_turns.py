"""The storage cost of one bot turn, with several conversations at once.

A turn of the chat pipeline touches storage five times: load the session, retrieve
(hybrid: a vector search and a keyword search of the guild), save the user's message
before calling the model, save the reply after it. This runs ``CONVERSATIONS``
conversations concurrently against one backend (coroutines on one event loop, as the
bot runs them), ``TURNS`` turns each, and reports per-turn p50/p99 and turns per second.
The model call is left out: it is what the bot waits for anyway, and it is not storage.

The keyword query is a number that occurs in one chunk's text (as a name or a number
in a question would); a query made only of the benchmark corpus's 37 words would match
most of the guild and measure the full-text engine rather than a turn.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.data import GUILD_ID, Dataset
from benchmarks.util import pct
from kotonoha_bot.db import DatabaseProtocol
from kotonoha_bot.models import ChatSession, Message

CONVERSATIONS = 8
TURNS = 25
TOP_K = 10


@dataclass
class TurnResult:
    """Per-turn seconds of one backend."""

    seconds: list[float]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        return {
            "p50": pct(self.seconds, 50),
            "p99": pct(self.seconds, 99),
            "mean": float(np.mean(self.seconds)),
            "turns": len(self.seconds),
            "turns_per_s": len(self.seconds) / self.wall_s,
            "conversations": CONVERSATIONS,
        }


async def prepare(db: DatabaseProtocol, tag: str) -> list[str]:
    """Create the conversations (a few turns of history each); return their keys."""
    keys = []
    for c in range(CONVERSATIONS):
        key = f"bench:{tag}:{c}"
        session = ChatSession(
            session_key=key, session_type="mention", guild_id=GUILD_ID, channel_id=10
        )
        for i in range(6):
            session.add_message(
                Message(role="user" if i % 2 == 0 else "assistant", content=f"history {c}/{i}")
            )
        await db.save_session(session)
        keys.append(key)
    return keys


async def run_turns(
    db: DatabaseProtocol, ds: Dataset, keys: list[str], turns: int = TURNS, offset: int = 0
) -> TurnResult:
    """Every conversation takes ``turns`` turns, all conversations at once."""
    seconds: list[float] = []

    async def conversation(c: int, key: str) -> None:
        for t in range(turns):
            i = (offset + c * turns + t) % len(ds.queries)
            row = (offset * 7919 + c * 104729 + t * 131) % ds.n
            start = time.perf_counter()
            session = await db.load_session(key)
            assert session is not None
            await db.similarity_search(ds.queries[i], guild_id=GUILD_ID, top_k=TOP_K)
            await db.keyword_search(str(row), guild_id=GUILD_ID, top_k=TOP_K)
            session.add_message(Message(role="user", content=f"question {t} about {row}"))
            await db.save_session(session)
            session.add_message(Message(role="assistant", content=f"answer {t}"))
            await db.save_session(session)
            seconds.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(conversation(c, k) for c, k in enumerate(keys)))
    return TurnResult(seconds, time.perf_counter() - start)
