"""Edits and deletes from Discord (and ``forget``): storage first, then catch up.

Storage removes the messages and every chunk built from them in one transaction (see
``DatabaseProtocol.delete_messages``). What is left for the pipeline:

1. the cached copies of the touched sessions are dropped, so the next prompt is built
   from what is stored — a deleted message never reaches a later prompt from memory;
2. the messages that shared a removed window are archived again without the removed
   one (:func:`kotonoha_bot.knowledge.archive.rearchive`), under the session's
   archiving lease so it never races the idle archiver.

Re-archiving is best effort: when it fails (the embedder is down: chunks are stored
pending; the database is down: logged) nothing removed comes back, and only some
knowledge of the surviving messages is missing until the next change.

The Discord ids a reply was sent as are linked to the stored reply right away; with
``SESSION_SYNC_INTERVAL`` > 0 the reply is stored only at the next flush, so the link
waits for it (and an edit or delete flushes first, so it always finds what it is about).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kotonoha_bot.chat.sessions import SessionManager
from kotonoha_bot.config import Settings
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.knowledge.archive import ARCHIVE_LEASE_SECONDS, WORKER_ID, rearchive
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.models import MessageChange
from kotonoha_bot.text import replace_nul

log = logging.getLogger("kotonoha_bot.chat")

ReplyLink = tuple[str, int, int, tuple[int, ...]]


class DiscordChanges:
    """Applies Discord's edits and deletes to storage and the session cache."""

    def __init__(
        self,
        db: DatabaseProtocol,
        embedder: EmbeddingProvider | None,
        sessions: SessionManager,
        settings: Settings,
    ) -> None:
        self._db = db
        self._embedder = embedder
        self._sessions = sessions
        self._settings = settings
        #: Reply links waiting for their reply to be stored (batch mode).
        self.pending_links: list[ReplyLink] = []

    # --- the bot's own replies ------------------------------------------------------

    async def link_reply(
        self, session_key: str, turn_id: int, channel_id: int, discord_ids: Sequence[int]
    ) -> None:
        """Link the Discord messages of a turn's reply to the stored reply (never raises)."""
        if not discord_ids:
            return
        link: ReplyLink = (session_key, turn_id, channel_id, tuple(discord_ids))
        if not self._sessions.durable:
            self.pending_links.append(link)
            return
        await self._link(link)

    async def _link(self, link: ReplyLink) -> bool:
        session_key, turn_id, channel_id, ids = link
        try:
            await self._db.record_reply_parts(session_key, turn_id, channel_id, ids)
        except KotonohaError as exc:
            log.warning("could not link the reply in %s: %s", session_key, exc)
            return False
        return True

    async def flush(self) -> int:
        """Store unsaved messages (batch mode), then the reply links waiting for them."""
        saved = await self._sessions.flush()
        pending, self.pending_links = self.pending_links, []
        for link in pending:
            if not await self._link(link):
                self.pending_links.append(link)
        return saved

    # --- edits and deletes ----------------------------------------------------------

    async def edited(self, guild_id: int | None, discord_id: int, text: str) -> MessageChange:
        """The stored text follows an edit (the NUL rule applied at this input edge)."""
        clean, _ = replace_nul(text)
        await self._flush_first()
        change = await self._db.edit_message(
            guild_id=guild_id, discord_message_id=discord_id, content=clean
        )
        await self.catch_up(change.sessions, change.rearchive)
        return change

    async def deleted(self, guild_id: int | None, discord_ids: Sequence[int]) -> MessageChange:
        """Deleted messages leave storage with what was built from them."""
        await self._flush_first()
        change = await self._db.delete_messages(guild_id=guild_id, discord_message_ids=discord_ids)
        await self.catch_up(change.sessions, change.rearchive)
        return change

    async def channel_deleted(self, guild_id: int, channel_id: int) -> MessageChange:
        """A deleted channel or thread takes its conversations and their knowledge."""
        await self._flush_first()
        change = await self._db.delete_channel_messages(guild_id=guild_id, channel_id=channel_id)
        await self.catch_up(change.sessions, change.rearchive)
        return change

    async def _flush_first(self) -> None:
        if not self._sessions.durable:
            await self.flush()

    async def catch_up(self, touched: Sequence[str], survivors: Mapping[str, Sequence[int]]) -> int:
        """Reload the touched sessions next time; archive the survivors again."""
        for key in touched:
            self._sessions.invalidate(session_key=key)
        added = 0
        s = self._settings
        for key, ids in survivors.items():
            if not ids:
                continue
            lease = f"archive:{key}"
            try:
                if not await self._db.acquire_lease(lease, WORKER_ID, ARCHIVE_LEASE_SECONDS):
                    log.warning("re-archiving %s skipped: another process is archiving it", key)
                    continue
                try:
                    added += await rearchive(
                        self._db,
                        self._embedder,
                        key,
                        ids,
                        window=s.archive_window_messages,
                        overlap=s.archive_window_overlap,
                        batch_size=s.embedding_batch_size,
                    )
                finally:
                    await self._db.release_lease(lease, WORKER_ID)
            except KotonohaError as exc:
                log.warning("re-archiving %s after a change failed: %s", key, exc)
        return added
