"""PostgreSQL: what the operator's dashboard browses and tends.

The same rules as :mod:`kotonoha_bot.db.sqlite.dashboard`: every statement names its
guild, deletes reuse the removal machinery of ``forget``
(:mod:`kotonoha_bot.db.postgres.provenance`) in one transaction, and the pause switch
and backup outcomes are ``kotonoha_meta`` rows (:mod:`kotonoha_bot.db.dashboard_meta`)
that every process sharing the server reads. The index state comes from the catalog
(``pg_index.indisvalid``) and, while ``CREATE INDEX`` runs in any session, from
``pg_stat_progress_create_index``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

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
from kotonoha_bot.db.postgres.schema import ANN_INDEX_NAME, IndexType
from kotonoha_bot.db.postgres.sql import Params
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

T = TypeVar("T")
Conn = Any  # asyncpg.Connection

_CHUNK_COLS = (
    "id, source_id, guild_id, channel_id, chunk_index, content, metadata,"
    " embedding IS NOT NULL AS embedded"
)
_SESSION_COLS = (
    "session_key, session_type, status, guild_id, channel_id, thread_id, user_id,"
    " version, message_count, last_archived_message_index, created_at, last_active_at"
)


def _source(r: Any) -> KnowledgeSource:
    return KnowledgeSource(
        source_id=r["id"],
        guild_id=r["guild_id"],
        channel_id=r["channel_id"],
        source_type=r["source_type"],
        uri=r["uri"],
        title=r["title"],
        content_hash=r["content_hash"],
        status=r["status"],
        metadata=json.loads(r["metadata"]),
        session_key=r["session_key"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


class PostgresDashboard:
    """Mixed into :class:`~kotonoha_bot.db.postgres.PostgreSQLDatabase` (uses its pool)."""

    if TYPE_CHECKING:
        _config: EmbeddingConfig | None
        _index_type: IndexType
        _scope_sizes: dict[tuple[Any, ...], tuple[float, int, int]]

        async def _run(
            self,
            what: str,
            body: Callable[[Conn], Awaitable[T]],
            *,
            write: bool = False,
            read_replica: bool = False,
        ) -> T: ...
        async def _set_meta(self, conn: Conn, items: Any) -> None: ...
        async def _chunk_message_ids(
            self, conn: Conn, chunk_ids: Sequence[int]
        ) -> dict[int, tuple[int, ...]]: ...
        async def _session_chunks(
            self, conn: Conn, session_keys: Sequence[str], guild_id: int
        ) -> list[int]: ...
        async def _remove(
            self,
            conn: Conn,
            gone: Sequence[int],
            *,
            replies: bool,
            extra_chunks: Iterable[int] = (),
            whole: Sequence[str] = (),
            touch: Sequence[str] = (),
        ) -> Any: ...
        async def _drop_emptied(self, conn: Conn, source_ids: set[int]) -> int: ...

    # --- guilds and sources -----------------------------------------------------------

    async def list_guilds(self) -> list[GuildSummary]:
        async def body(conn: Conn) -> list[GuildSummary]:
            return [
                GuildSummary(
                    guild_id=int(r[0]),
                    sessions=int(r[1]),
                    sources=int(r[2]),
                    chunks=int(r[3]),
                    memories=int(r[4]),
                    last_active_at=r[5],
                )
                for r in await conn.fetch(GUILDS_SQL)
            ]

        return await self._run("listing guilds", body)

    async def source_summaries(self, guild_id: int) -> list[SourceSummary]:
        check_ids("source summaries", guild_id)

        async def body(conn: Conn) -> list[SourceSummary]:
            rows = await conn.fetch(
                "SELECT k.*, count(c.id) AS n_chunks,"
                " count(c.id) - count(c.embedding) AS n_pending"
                " FROM knowledge_sources k LEFT JOIN knowledge_chunks c ON c.source_id = k.id"
                " WHERE k.guild_id = $1 GROUP BY k.id ORDER BY k.updated_at DESC, k.id DESC",
                guild_id,
            )
            return [
                SourceSummary(
                    source=_source(r), chunks=int(r["n_chunks"]), pending=int(r["n_pending"])
                )
                for r in rows
            ]

        return await self._run(f"listing the sources of guild {guild_id}", body)

    # --- chunks -----------------------------------------------------------------------

    async def _chunk_infos(self, conn: Conn, rows: Sequence[Any]) -> list[ChunkInfo]:
        links = await self._chunk_message_ids(conn, [int(r["id"]) for r in rows])
        return [
            ChunkInfo(
                chunk_id=int(r["id"]),
                source_id=int(r["source_id"]),
                guild_id=int(r["guild_id"]),
                channel_id=r["channel_id"],
                chunk_index=int(r["chunk_index"]),
                content=r["content"],
                metadata=json.loads(r["metadata"]),
                embedded=bool(r["embedded"]),
                message_ids=links.get(int(r["id"]), ()),
            )
            for r in rows
        ]

    async def list_chunk_page(
        self, source_id: int, *, guild_id: int, offset: int = 0, limit: int = 50
    ) -> list[ChunkInfo]:
        check_ids("listing chunks", source_id, guild_id)
        check_page(offset, limit)

        async def body(conn: Conn) -> list[ChunkInfo]:
            rows = await conn.fetch(
                f"SELECT {_CHUNK_COLS} FROM knowledge_chunks WHERE source_id = $1"
                " AND guild_id = $2 ORDER BY chunk_index, id LIMIT $3 OFFSET $4",
                source_id,
                guild_id,
                limit,
                offset,
            )
            return await self._chunk_infos(conn, rows)

        return await self._run(f"listing chunks of source {source_id}", body)

    async def get_chunk(self, chunk_id: int, *, guild_id: int) -> ChunkInfo | None:
        check_ids("reading a chunk", chunk_id, guild_id)

        async def body(conn: Conn) -> list[ChunkInfo]:
            rows = await conn.fetch(
                f"SELECT {_CHUNK_COLS} FROM knowledge_chunks WHERE id = $1 AND guild_id = $2",
                chunk_id,
                guild_id,
            )
            return await self._chunk_infos(conn, rows)

        found = await self._run(f"reading chunk {chunk_id}", body)
        return found[0] if found else None

    async def delete_chunk(self, chunk_id: int, *, guild_id: int) -> bool:
        check_ids("deleting a chunk", chunk_id, guild_id)

        async def body(conn: Conn) -> bool:
            source_id = await conn.fetchval(
                "DELETE FROM knowledge_chunks WHERE id = $1 AND guild_id = $2 RETURNING source_id",
                chunk_id,
                guild_id,
            )
            if source_id is None:
                return False
            await self._drop_emptied(conn, {int(source_id)})
            return True

        deleted = await self._run(f"deleting chunk {chunk_id}", body, write=True)
        self._scope_sizes.clear()
        return deleted

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
        params = Params()
        sql = f"SELECT {_SESSION_COLS} FROM sessions s WHERE s.guild_id = {params.add(guild_id)}"
        if channel_id is not None:
            n = params.add(channel_id)
            sql += f" AND (s.channel_id = {n} OR s.thread_id = {n})"
        if user_id is not None:
            n = params.add(user_id)
            sql += (
                f" AND (s.user_id = {n} OR EXISTS (SELECT 1 FROM messages m"
                f" WHERE m.session_key = s.session_key AND m.author_id = {n}))"
            )
        sql += (
            " ORDER BY s.last_active_at DESC, s.session_key"
            f" LIMIT {params.add(limit)} OFFSET {params.add(offset)}"
        )

        async def body(conn: Conn) -> list[SessionInfo]:
            return [SessionInfo(**dict(r)) for r in await conn.fetch(sql, *params)]

        return await self._run(f"finding sessions of guild {guild_id}", body)

    async def delete_conversation(self, session_key: str, *, guild_id: int) -> ForgetResult:
        check_text(session_key, "session_key")
        check_ids("deleting a conversation", guild_id)

        async def body(conn: Conn) -> Any:
            found = await conn.fetchval(
                "SELECT 1 FROM sessions WHERE session_key = $1 AND guild_id = $2 FOR UPDATE",
                session_key,
                guild_id,
            )
            if found is None:
                return None
            gone = [
                int(r["id"])
                for r in await conn.fetch(
                    "SELECT id FROM messages WHERE session_key = $1", session_key
                )
            ]
            extra = await self._session_chunks(conn, [session_key], guild_id)
            return await self._remove(
                conn, gone, replies=False, extra_chunks=extra, whole=[session_key]
            )

        removal = await self._run(f"deleting session {session_key!r}", body, write=True)
        if removal is None:
            return ForgetResult(messages=0, sessions=0, chunks=0, sources=0)
        self._scope_sizes.clear()
        return ForgetResult(
            messages=removal.messages,
            sessions=removal.sessions_deleted,
            chunks=len(removal.chunks),
            sources=removal.sources,
            session_keys=removal.touched,
            rearchive=removal.rearchive,
        )

    # --- the pause switch and backup outcomes ---------------------------------------------

    async def _meta(self, key: str) -> str | None:
        async def body(conn: Conn) -> str | None:
            value = await conn.fetchval("SELECT value FROM kotonoha_meta WHERE key = $1", key)
            return None if value is None else str(value)

        return await self._run(f"reading {key}", body)

    async def pause_state(self) -> PauseState:
        return decode_pause(await self._meta(PAUSE_KEY))

    async def set_paused(self, paused: bool, *, by: str = "") -> PauseState:
        check_text(by, "who paused the bot")

        async def body(conn: Conn) -> None:
            if paused:
                # A second pause keeps the first one's time: "paused since" stays true.
                await conn.execute(
                    "INSERT INTO kotonoha_meta (key, value) VALUES ($1, $2)"
                    " ON CONFLICT (key) DO NOTHING",
                    PAUSE_KEY,
                    encode_pause(utcnow(), by),
                )
            else:
                await conn.execute("DELETE FROM kotonoha_meta WHERE key = $1", PAUSE_KEY)

        await self._run("setting the pause switch", body, write=True)
        return await self.pause_state()

    async def record_backup(self, record: BackupRecord) -> None:
        check_backup_record(record)

        async def body(conn: Conn) -> None:
            await self._set_meta(conn, {backup_key(not record.ok): encode_backup(record)})

        await self._run("recording a backup", body, write=True)

    async def last_backup(self, *, failed: bool = False) -> BackupRecord | None:
        return decode_backup(await self._meta(backup_key(failed)))

    # --- the vector index -------------------------------------------------------------------

    async def vector_index_state(self) -> VectorIndexState:
        async def body(conn: Conn) -> VectorIndexState:
            index = await conn.fetchrow(
                "SELECT am.amname AS kind, x.indisvalid AS valid, x.indisready AS ready,"
                " pg_relation_size(i.oid) AS size FROM pg_class i"
                " JOIN pg_index x ON x.indexrelid = i.oid JOIN pg_am am ON am.oid = i.relam"
                " WHERE i.oid = to_regclass($1)",
                ANN_INDEX_NAME,
            )
            progress = await conn.fetchrow(
                "SELECT phase, blocks_total, blocks_done, tuples_total, tuples_done"
                " FROM pg_stat_progress_create_index"
                " WHERE relid = to_regclass('knowledge_chunks')"
            )
            kind = str(index["kind"]) if index is not None else self._index_type
            if progress is not None:
                done, total = progress["tuples_done"], progress["tuples_total"]
                if not total:
                    done, total = progress["blocks_done"], progress["blocks_total"]
                share = float(done) / float(total) if total else None
                return VectorIndexState(kind, "building", str(progress["phase"]), share)
            if index is None:
                detail = (
                    "exact search; created when the first embedding model is recorded"
                    if self._config is None
                    else "exact search until the index is built"
                )
                return VectorIndexState(kind, "missing", detail)
            if not (index["valid"] and index["ready"]):
                return VectorIndexState(
                    kind, "invalid", "an interrupted build: rebuild it on the status page"
                )
            return VectorIndexState(kind, "ready", f"{int(index['size']):,} bytes")

        return await self._run("reading the vector index state", body)
