"""Active sessions cached in memory, saved through the storage contract.

**Durability.** With ``SESSION_SYNC_INTERVAL=0`` (the default) every message is
written before the pipeline goes on: the user's message before the model is asked,
the reply before it is sent. A reply the user has seen is therefore on disk (SQLite
runs with ``synchronous=FULL``), and a crash loses at most the turn in flight, whose
reply nobody saw. Two small writes per turn are cheap next to an LLM call, which is
why this is the default. With an interval > 0, appends are kept in memory and saved
by :meth:`SessionManager.flush` (the bot calls it every interval and at shutdown);
a crash then loses up to one interval of acknowledged messages.

**Conflicts.** ``save_session`` uses optimistic locking. When it raises
``SessionConflictError`` (another process, the archiver or ``forget`` changed the
session), the manager reloads the stored session, appends the messages it had not
stored yet, and saves again: nothing is dropped and nothing is written twice.

One ``asyncio.Lock`` per session serialises turns, so history stays in order and
the in-memory copy is never changed while it is being saved.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from kotonoha_bot.chat.conversation import Conversation
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import SessionConflictError
from kotonoha_bot.models import ChatSession, Message, SessionStatus

log = logging.getLogger("kotonoha_bot.chat")

#: Reload-and-append rounds before giving up (each round means someone else wrote).
MAX_SAVE_ATTEMPTS = 8
#: Sessions kept in memory; the least recently used idle ones are dropped beyond it.
DEFAULT_MAX_CACHED = 256


class SessionHandle:
    """A session opened under its lock: read it, append to it."""

    def __init__(self, manager: SessionManager, key: str) -> None:
        self._manager = manager
        self._key = key

    @property
    def session(self) -> ChatSession:
        """The current in-memory copy (replaced after a conflict reload)."""
        return self._manager._cache[self._key]

    async def append(self, *messages: Message) -> ChatSession:
        """Append messages; durable before returning when the sync interval is 0."""
        return await self._manager._append(self._key, messages)

    async def set_status(self, status: SessionStatus) -> ChatSession:
        """Change the session's status (saved like an append)."""
        return await self._manager._set_status(self._key, status)


class SessionManager:
    """Loads, caches and saves sessions; resolves optimistic-lock conflicts."""

    def __init__(
        self,
        db: DatabaseProtocol,
        *,
        sync_interval: float = 0.0,
        max_cached: int = DEFAULT_MAX_CACHED,
    ) -> None:
        self._db = db
        self.sync_interval = sync_interval
        self._max_cached = max_cached
        self._cache: OrderedDict[str, ChatSession] = OrderedDict()
        self._convs: dict[str, Conversation] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}  # coroutines holding or waiting for a key's lock
        self._unsaved: dict[str, list[Message]] = {}
        self._status: dict[str, SessionStatus] = {}
        self._stale: set[str] = set()
        self.conflicts_resolved = 0

    @property
    def durable(self) -> bool:
        """True when every append is saved before it returns."""
        return self.sync_interval <= 0

    @asynccontextmanager
    async def open(self, conv: Conversation) -> AsyncIterator[SessionHandle]:
        """Lock the session, load or create it, and yield a handle."""
        key = conv.session_key
        async with self._locked(key):
            self._convs[key] = conv
            await self._ensure_loaded(conv)
            yield SessionHandle(self, key)
        self._trim()

    async def peek(self, session_key: str) -> ChatSession | None:
        """The session if it exists (cached copy or stored), without creating it."""
        cached = self._cache.get(session_key)
        if cached is not None and session_key not in self._stale:
            return cached
        return await self._db.load_session(session_key)

    def unsaved_count(self) -> int:
        """Messages appended but not stored yet (0 in durable mode between turns)."""
        return sum(len(v) for v in self._unsaved.values())

    async def flush(self) -> int:
        """Save every session with unsaved changes; returns sessions saved."""
        saved = 0
        for key in list(self._unsaved.keys() | self._status.keys()):
            async with self._locked(key):
                if key in self._unsaved or key in self._status:
                    await self._save(key)
                    saved += 1
        return saved

    async def close(self) -> None:
        """Flush (the shutdown path of batch mode)."""
        await self.flush()

    def invalidate(self, *, guild_id: int | None = None, session_key: str | None = None) -> None:
        """Forget cached copies (after ``forget``/deletes) so the next turn reloads them."""
        for key, session in list(self._cache.items()):
            if session_key is not None and key != session_key:
                continue
            if guild_id is not None and session.guild_id != guild_id:
                continue
            if self._droppable(key):
                self._drop(key)
            else:
                self._stale.add(key)

    def evict_idle(self, before: datetime) -> int:
        """Drop cached sessions idle since ``before`` (e.g. before archiving them)."""
        dropped = 0
        for key, session in list(self._cache.items()):
            if session.last_active_at < before and self._droppable(key):
                self._drop(key)
                dropped += 1
        return dropped

    # --- internals ----------------------------------------------------------------------

    @asynccontextmanager
    async def _locked(self, key: str) -> AsyncIterator[None]:
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]

    def _droppable(self, key: str) -> bool:
        return key not in self._users and key not in self._unsaved and key not in self._status

    def _drop(self, key: str) -> None:
        self._cache.pop(key, None)
        self._locks.pop(key, None)  # no one holds or awaits it (see _droppable)
        self._convs.pop(key, None)
        self._stale.discard(key)

    def _trim(self) -> None:
        if len(self._cache) <= self._max_cached:
            return
        for key in list(self._cache.keys()):
            if len(self._cache) <= self._max_cached:
                break
            if self._droppable(key):
                self._drop(key)

    async def _ensure_loaded(self, conv: Conversation) -> None:
        key = conv.session_key
        if key in self._cache and key not in self._stale:
            self._cache.move_to_end(key)
            return
        if key in self._cache:  # stale: re-read, keeping what was not stored yet
            await self._rebase(key, self._cache[key])
            self._stale.discard(key)
            return
        stored = await self._db.load_session(key)
        self._cache[key] = stored if stored is not None else self._new(conv)

    @staticmethod
    def _new(conv: Conversation) -> ChatSession:
        return ChatSession(
            session_key=conv.session_key,
            session_type=conv.session_type,
            guild_id=conv.guild_id,
            channel_id=conv.channel_id,
            thread_id=conv.thread_id,
            user_id=conv.user_id,
        )

    async def _append(self, key: str, messages: tuple[Message, ...]) -> ChatSession:
        session = self._cache[key]
        for m in messages:
            session.add_message(m)
        self._unsaved.setdefault(key, []).extend(messages)
        if self.durable:
            return await self._save(key)
        return session

    async def _set_status(self, key: str, status: SessionStatus) -> ChatSession:
        self._cache[key].status = status
        self._status[key] = status
        if self.durable:
            return await self._save(key)
        return self._cache[key]

    async def _save(self, key: str) -> ChatSession:
        session = self._cache[key]
        for _ in range(MAX_SAVE_ATTEMPTS):
            try:
                await self._db.save_session(session)
            except SessionConflictError as exc:
                log.info("session %s changed elsewhere (%s); reloading", key, exc)
                session = await self._rebase(key, session)
                self.conflicts_resolved += 1
                continue
            self._unsaved.pop(key, None)
            self._status.pop(key, None)
            return session
        raise SessionConflictError(
            f"session {key!r}: still conflicting after {MAX_SAVE_ATTEMPTS} reloads;"
            " its unsaved messages are kept in memory and retried on the next save"
        )

    async def _rebase(self, key: str, stale: ChatSession) -> ChatSession:
        """The stored session plus what this manager has not stored yet."""
        fresh = await self._db.load_session(key)
        if fresh is None:  # deleted meanwhile (forget): start over with the unsaved part
            conv = self._convs.get(key)
            fresh = (
                self._new(conv)
                if conv is not None
                else ChatSession(
                    session_key=key,
                    session_type=stale.session_type,
                    guild_id=stale.guild_id,
                    channel_id=stale.channel_id,
                    thread_id=stale.thread_id,
                    user_id=stale.user_id,
                )
            )
        for m in self._unsaved.get(key, []):
            fresh.add_message(m)
        if key in self._status:
            fresh.status = self._status[key]
        self._cache[key] = fresh
        return fresh
