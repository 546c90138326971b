"""SQLite: what the operator's dashboard browses and tends.

Every listing and every delete names its guild in SQL, so a chunk, source or session
id taken from another guild's page (a hand-edited URL) finds nothing: the dashboard
cannot cross guilds even if it asked the wrong question. Deletes go through the same
removal machinery as ``forget`` (:mod:`kotonoha_bot.db.sqlite.provenance`), so a
deleted conversation leaves no chunk built from it, and the in-memory vector cache
drops what was deleted after the commit.

The pause switch and backup outcomes are ``kotonoha_meta`` rows
(:mod:`kotonoha_bot.db.dashboard_meta`): a bot process sees a pause written by a
separate ``kotonoha dashboard`` process on its next read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import aiosqlite

from kotonoha_bot.db.checks import check_backup_record, check_ids, check_page
from kotonoha_bot.db.contract import ForgetResult
from kotonoha_bot.db.dashboard_meta import (
    GUILDS_SQL,
    PAUSE_KEY,
    backup_key,
    decode_backup,
    decode_pause,
    encode_backup,
    encode_pause,
)
from kotonoha_bot.db.sqlite.values import dt, ts
from kotonoha_bot.models import (
    BackupRecord,
    ChunkInfo,
    EmbeddingConfig,
    GuildSummary,
    KnowledgeSource,
    PauseState,
    SessionInfo,
    SourceSummary,
    VectorIndexState,
    utcnow,
)
from kotonoha_bot.text import check_text

if TYPE_CHECKING:
    from kotonoha_bot.db.sqlite.vector_cache import CacheKind, VectorCache

_CHUNK_COLS = (
    "id, source_id, guild_id, channel_id, chunk_index, content, metadata, embedding IS NOT NULL"
)
_SESSION_COLS = (
    "session_key, session_type, status, guild_id, channel_id, thread_id, user_id,"
    " version, message_count, last_archived_message_index, created_at, last_active_at"
)


class SQLiteDashboard:
    """Mixed into :class:`~kotonoha_bot.db.sqlite.SQLiteDatabase` (uses its connection)."""

    if TYPE_CHECKING:
        _SOURCE_COLS: str
        _cache: VectorCache | None
        _cache_kind: CacheKind
        _config: EmbeddingConfig | None

        def _write(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...
        def _read(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...
        def _cache_remove(self, chunk_ids: Iterable[int]) -> None: ...
        @staticmethod
        def _source(r: Sequence[Any]) -> KnowledgeSource: ...
        @staticmethod
        async def _refresh_status(
            conn: aiosqlite.Connection, source_ids: Iterable[int], now: str
        ) -> None: ...
        async def _chunk_message_ids(
            self, conn: aiosqlite.Connection, chunk_ids: Sequence[int]
        ) -> dict[int, tuple[int, ...]]: ...
        async def _fill_gone(
            self,
            conn: aiosqlite.Connection,
            select_sql: str,
            params: Sequence[Any],
            *,
            replies: bool,
        ) -> None: ...
        async def _session_chunks(
            self, conn: aiosqlite.Connection, session_keys: Sequence[str], guild_id: int
        ) -> list[int]: ...
        async def _remove_gone(
            self,
            conn: aiosqlite.Connection,
            *,
            extra_chunks: Sequence[int] = (),
            delete_sessions: Sequence[str] = (),
            touch: Sequence[str] = (),
        ) -> Any: ...
        async def _delete_emptied_sources(
            self, conn: aiosqlite.Connection, source_ids: Iterable[int]
        ) -> int: ...

    # --- guilds and sources -----------------------------------------------------------

    async def list_guilds(self) -> list[GuildSummary]:
        async with self._read("listing guilds") as conn:
            rows = await (await conn.execute(GUILDS_SQL)).fetchall()
        return [
            GuildSummary(
                guild_id=int(r[0]),
                sessions=int(r[1]),
                sources=int(r[2]),
                chunks=int(r[3]),
                memories=int(r[4]),
                last_active_at=None if r[5] is None else dt(r[5]),
            )
            for r in rows
        ]

    async def source_summaries(self, guild_id: int) -> list[SourceSummary]:
        check_ids("source summaries", guild_id)
        cols = ", ".join(f"k.{c.strip()}" for c in self._SOURCE_COLS.split(","))
        async with self._read(f"listing the sources of guild {guild_id}") as conn:
            rows = await (
                await conn.execute(
                    f"SELECT {cols}, count(c.id), count(c.id) - count(c.embedding)"
                    " FROM knowledge_sources k LEFT JOIN knowledge_chunks c ON c.source_id = k.id"
                    " WHERE k.guild_id = ? GROUP BY k.id ORDER BY k.updated_at DESC, k.id DESC",
                    (guild_id,),
                )
            ).fetchall()
        return [
            SourceSummary(source=self._source(r[:-2]), chunks=int(r[-2]), pending=int(r[-1]))
            for r in rows
        ]

    # --- chunks -----------------------------------------------------------------------

    async def _chunk_infos(
        self, conn: aiosqlite.Connection, rows: Sequence[Sequence[Any]]
    ) -> list[ChunkInfo]:
        links = await self._chunk_message_ids(conn, [int(r[0]) for r in rows])
        return [
            ChunkInfo(
                chunk_id=int(r[0]),
                source_id=int(r[1]),
                guild_id=int(r[2]),
                channel_id=r[3],
                chunk_index=int(r[4]),
                content=r[5],
                metadata=json.loads(r[6]),
                embedded=bool(r[7]),
                message_ids=links.get(int(r[0]), ()),
            )
            for r in rows
        ]

    async def list_chunk_page(
        self, source_id: int, *, guild_id: int, offset: int = 0, limit: int = 50
    ) -> list[ChunkInfo]:
        check_ids("listing chunks", source_id, guild_id)
        check_page(offset, limit)
        async with self._read(f"listing chunks of source {source_id}") as conn:
            rows = await (
                await conn.execute(
                    f"SELECT {_CHUNK_COLS} FROM knowledge_chunks WHERE source_id = ?"
                    " AND guild_id = ? ORDER BY chunk_index, id LIMIT ? OFFSET ?",
                    (source_id, guild_id, limit, offset),
                )
            ).fetchall()
            return await self._chunk_infos(conn, list(rows))

    async def get_chunk(self, chunk_id: int, *, guild_id: int) -> ChunkInfo | None:
        check_ids("reading a chunk", chunk_id, guild_id)
        async with self._read(f"reading chunk {chunk_id}") as conn:
            rows = await (
                await conn.execute(
                    f"SELECT {_CHUNK_COLS} FROM knowledge_chunks WHERE id = ? AND guild_id = ?",
                    (chunk_id, guild_id),
                )
            ).fetchall()
            found = await self._chunk_infos(conn, list(rows))
        return found[0] if found else None

    async def delete_chunk(self, chunk_id: int, *, guild_id: int) -> bool:
        check_ids("deleting a chunk", chunk_id, guild_id)
        async with self._write(f"deleting chunk {chunk_id}") as conn:
            row = await (
                await conn.execute(
                    "SELECT source_id FROM knowledge_chunks WHERE id = ? AND guild_id = ?",
                    (chunk_id, guild_id),
                )
            ).fetchone()
            if row is None:
                return False
            source_id = int(row[0])
            await conn.execute("DELETE FROM knowledge_chunks WHERE id = ?", (chunk_id,))
            if not await self._delete_emptied_sources(conn, [source_id]):
                await self._refresh_status(conn, [source_id], ts(utcnow()))
        self._cache_remove([chunk_id])
        return True

    # --- conversations ------------------------------------------------------------------

    async def find_sessions(
        self,
        *,
        guild_id: int,
        channel_id: int | None = None,
        user_id: int | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> list[SessionInfo]:
        check_ids("finding sessions", guild_id, channel_id, user_id)
        check_page(offset, limit)
        sql = f"SELECT {_SESSION_COLS} FROM sessions s WHERE s.guild_id = ?"
        params: list[Any] = [guild_id]
        if channel_id is not None:
            sql += " AND (s.channel_id = ? OR s.thread_id = ?)"
            params += [channel_id, channel_id]
        if user_id is not None:
            sql += (
                " AND (s.user_id = ? OR EXISTS (SELECT 1 FROM messages m"
                " WHERE m.session_key = s.session_key AND m.author_id = ?))"
            )
            params += [user_id, user_id]
        sql += " ORDER BY s.last_active_at DESC, s.session_key LIMIT ? OFFSET ?"
        params += [limit, offset]
        async with self._read(f"finding sessions of guild {guild_id}") as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        return [
            SessionInfo(
                session_key=r[0],
                session_type=r[1],
                status=r[2],
                guild_id=r[3],
                channel_id=r[4],
                thread_id=r[5],
                user_id=r[6],
                version=r[7],
                message_count=r[8],
                last_archived_message_index=r[9],
                created_at=dt(r[10]),
                last_active_at=dt(r[11]),
            )
            for r in rows
        ]

    async def delete_conversation(self, session_key: str, *, guild_id: int) -> ForgetResult:
        check_text(session_key, "session_key")
        check_ids("deleting a conversation", guild_id)
        async with self._write(f"deleting session {session_key!r}") as conn:
            row = await (
                await conn.execute(
                    "SELECT 1 FROM sessions WHERE session_key = ? AND guild_id = ?",
                    (session_key, guild_id),
                )
            ).fetchone()
            if row is None:
                return ForgetResult(messages=0, sessions=0, chunks=0, sources=0)
            await self._fill_gone(
                conn,
                "SELECT id FROM messages WHERE session_key = ?",
                [session_key],
                replies=False,
            )
            extra = await self._session_chunks(conn, [session_key], guild_id)
            removal = await self._remove_gone(
                conn, extra_chunks=extra, delete_sessions=[session_key]
            )
        self._cache_remove(removal.chunks or [])
        return ForgetResult(
            messages=removal.messages,
            sessions=removal.sessions_deleted,
            chunks=len(removal.chunks or []),
            sources=removal.sources,
            session_keys=removal.touched,
            rearchive=removal.rearchive or {},
        )

    # --- the pause switch and backup outcomes ---------------------------------------------

    async def _meta(self, key: str) -> str | None:
        async with self._read(f"reading {key}") as conn:
            row = await (
                await conn.execute("SELECT value FROM kotonoha_meta WHERE key = ?", (key,))
            ).fetchone()
        return None if row is None else str(row[0])

    async def pause_state(self) -> PauseState:
        return decode_pause(await self._meta(PAUSE_KEY))

    async def set_paused(self, paused: bool, *, by: str = "") -> PauseState:
        check_text(by, "who paused the bot")
        async with self._write("setting the pause switch") as conn:
            if paused:
                # A second pause keeps the first one's time: "paused since" stays true.
                await conn.execute(
                    "INSERT INTO kotonoha_meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO NOTHING",
                    (PAUSE_KEY, encode_pause(utcnow(), by)),
                )
            else:
                await conn.execute("DELETE FROM kotonoha_meta WHERE key = ?", (PAUSE_KEY,))
        return await self.pause_state()

    async def record_backup(self, record: BackupRecord) -> None:
        check_backup_record(record)
        async with self._write("recording a backup") as conn:
            await conn.execute(
                "INSERT OR REPLACE INTO kotonoha_meta (key, value) VALUES (?, ?)",
                (backup_key(not record.ok), encode_backup(record)),
            )

    async def last_backup(self, *, failed: bool = False) -> BackupRecord | None:
        return decode_backup(await self._meta(backup_key(failed)))

    # --- the vector cache -------------------------------------------------------------------

    async def vector_index_state(self) -> VectorIndexState:
        kind = f"{self._cache_kind} in-memory cache"
        async with self._read("reading the vector cache state") as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL"
                )
            ).fetchone()
        embedded = int(row[0]) if row else 0
        cache = self._cache
        if cache is None:
            return VectorIndexState(
                kind, "cold", f"{embedded} vectors on disk; loaded by the first search"
            )
        return VectorIndexState(kind, "ready", f"{len(cache)} of {embedded} vectors in memory")
