"""SQLiteDatabase: the embedded default, on aiosqlite (sessions, config, leases, stats here).

One long-lived connection (WAL, foreign keys, busy timeout, synchronous=FULL so an
acknowledged turn survives a power cut). Every operation runs under one asyncio
lock, so the statements of one transaction never interleave with another
coroutine's. Vectors are float32 BLOBs on disk and compact codes in memory
(``VectorCache``, int4 by default): a search shortlists by code score and re-ranks the
shortlist by exact float32 cosine read from the BLOBs, so similarities are exact. The
cache is updated only after a transaction commits and reloaded when another process
changed the file (``PRAGMA data_version``).

The class is assembled from mixins, one concern each: ``connection.py`` (the
connection, transactions, the vector cache), ``knowledge.py`` (sources, chunks,
re-embedding), ``search.py`` (vector and keyword search), ``provenance.py`` (edits and
deletes that follow Discord, forget), ``memories.py`` (memories, usage),
``dashboard.py`` (the operator's pages); the schema
is ``schema.py``.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db.checks import (
    check_embedding_config,
    check_ids,
    check_limit,
    check_session,
)
from kotonoha_bot.db.sqlite.memories import SQLiteMemories
from kotonoha_bot.db.sqlite.provenance import SQLiteProvenance
from kotonoha_bot.db.sqlite.values import dt as _dt
from kotonoha_bot.db.sqlite.values import ts as _ts
from kotonoha_bot.db.sqlite.vector_kernels import SIMD_BACKEND
from kotonoha_bot.errors import (
    InvalidInputError,
    SessionConflictError,
)
from kotonoha_bot.models import (
    ChatSession,
    DatabaseStats,
    EmbeddingConfig,
    Message,
    SessionInfo,
    utcnow,
)
from kotonoha_bot.text import (
    check_text,
)

if TYPE_CHECKING:
    pass
from kotonoha_bot.db.sqlite.connection import SQLiteConnection
from kotonoha_bot.db.sqlite.dashboard import SQLiteDashboard
from kotonoha_bot.db.sqlite.knowledge import SQLiteKnowledge
from kotonoha_bot.db.sqlite.schema import LATEST_SCHEMA_VERSION
from kotonoha_bot.db.sqlite.search import SQLiteSearch


class SQLiteDatabase(
    SQLiteDashboard,
    SQLiteSearch,
    SQLiteKnowledge,
    SQLiteProvenance,
    SQLiteMemories,
    SQLiteConnection,
):
    """The embedded backend: one file, one connection, exact vector search."""

    backend_name = "sqlite"
    #: The schema this code expects (the health check and the dashboard compare it).
    latest_schema_version = LATEST_SCHEMA_VERSION
    capabilities: frozenset[str] = frozenset()

    # --- sessions -------------------------------------------------------------------

    async def save_session(self, session: ChatSession) -> None:
        check_session(session)
        key = session.session_key
        async with self._write(f"saving session {key!r}") as conn:
            row = await (
                await conn.execute(
                    "SELECT version, message_count, "
                    " (SELECT coalesce(max(seq), -1) FROM messages WHERE session_key = ?)"
                    " FROM sessions WHERE session_key = ?",
                    (key, key),
                )
            ).fetchone()
            if session.version == 0:
                if row is not None:
                    raise SessionConflictError(
                        f"session {key!r} already exists (stored version {row[0]});"
                        " load it and append instead"
                    )
                stored_count, next_seq = 0, 0
                await conn.execute(
                    "INSERT INTO sessions (session_key, session_type, status, guild_id,"
                    " channel_id, thread_id, user_id, version, message_count,"
                    " last_archived_message_index, created_at, last_active_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                    (
                        key,
                        session.session_type,
                        session.status,
                        session.guild_id,
                        session.channel_id,
                        session.thread_id,
                        session.user_id,
                        len(session.messages),
                        session.last_archived_message_index,
                        _ts(session.created_at),
                        _ts(session.last_active_at),
                    ),
                )
            else:
                if row is None or row[0] != session.version:
                    stored = "deleted" if row is None else f"at version {row[0]}"
                    raise SessionConflictError(
                        f"session {key!r} changed since version {session.version}"
                        f" (now {stored}); reload it and apply the change again"
                    )
                stored_count, next_seq = int(row[1]), int(row[2]) + 1
                if len(session.messages) < stored_count:
                    raise InvalidInputError(
                        f"session {key!r}: {len(session.messages)} messages but"
                        f" {stored_count} are stored; messages can only be appended"
                    )
                await conn.execute(
                    "UPDATE sessions SET session_type = ?, status = ?, guild_id = ?,"
                    " channel_id = ?, thread_id = ?, user_id = ?, version = version + 1,"
                    " message_count = ?, last_archived_message_index = ?, last_active_at = ?"
                    " WHERE session_key = ? AND version = ?",
                    (
                        session.session_type,
                        session.status,
                        session.guild_id,
                        session.channel_id,
                        session.thread_id,
                        session.user_id,
                        len(session.messages),
                        session.last_archived_message_index,
                        _ts(session.last_active_at),
                        key,
                        session.version,
                    ),
                )
            new = session.messages[stored_count:]
            if new:
                await conn.executemany(
                    "INSERT INTO messages (session_key, seq, role, content, author_id,"
                    " author_name, discord_message_id, created_at, channel_id, turn_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            key,
                            next_seq + i,
                            m.role,
                            m.content,
                            m.author_id,
                            m.author_name,
                            m.discord_message_id,
                            _ts(m.timestamp),
                            m.channel_id,
                            m.turn_id,
                        )
                        for i, m in enumerate(new)
                    ],
                )
        session.version += 1

    async def load_session(self, session_key: str) -> ChatSession | None:
        async with self._read(f"loading session {session_key!r}") as conn:
            row = await (
                await conn.execute(
                    "SELECT session_key, session_type, status, guild_id, channel_id, thread_id,"
                    " user_id, version, last_archived_message_index, created_at, last_active_at"
                    " FROM sessions WHERE session_key = ?",
                    (session_key,),
                )
            ).fetchone()
            if row is None:
                return None
            messages = await (
                await conn.execute(
                    "SELECT role, content, created_at, author_id, author_name, discord_message_id,"
                    " channel_id, turn_id, id FROM messages WHERE session_key = ? ORDER BY seq",
                    (session_key,),
                )
            ).fetchall()
        return ChatSession(
            session_key=row[0],
            session_type=row[1],
            status=row[2],
            guild_id=row[3],
            channel_id=row[4],
            thread_id=row[5],
            user_id=row[6],
            version=row[7],
            last_archived_message_index=row[8],
            created_at=_dt(row[9]),
            last_active_at=_dt(row[10]),
            messages=[
                Message(
                    role=m[0],
                    content=m[1],
                    timestamp=_dt(m[2]),
                    author_id=m[3],
                    author_name=m[4],
                    discord_message_id=m[5],
                    channel_id=m[6],
                    turn_id=m[7],
                    stored_id=m[8],
                )
                for m in messages
            ],
        )

    async def delete_session(self, session_key: str) -> bool:
        async with self._write(f"deleting session {session_key!r}") as conn:
            cur = await conn.execute("DELETE FROM sessions WHERE session_key = ?", (session_key,))
            return cur.rowcount > 0

    async def list_sessions(
        self,
        *,
        guild_id: int | None = None,
        status: str | None = None,
        idle_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[SessionInfo]:
        check_ids("list_sessions", guild_id)
        if limit is not None:
            check_limit(limit, "list_sessions")
        where: list[str] = []
        params: list[Any] = []
        if guild_id is not None:
            where.append("guild_id = ?")
            params.append(guild_id)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if idle_before is not None:
            where.append("last_active_at < ?")
            params.append(_ts(idle_before))
        sql = (
            "SELECT session_key, session_type, status, guild_id, channel_id, thread_id, user_id,"
            " version, message_count, last_archived_message_index, created_at, last_active_at"
            " FROM sessions"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY last_active_at, session_key"
            + (" LIMIT ?" if limit is not None else "")
        )
        if limit is not None:
            params.append(limit)
        async with self._read("listing sessions") as conn:
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
                created_at=_dt(r[10]),
                last_active_at=_dt(r[11]),
            )
            for r in rows
        ]

    # --- embedding configuration ----------------------------------------------------

    async def get_embedding_config(self) -> EmbeddingConfig | None:
        async with self._read("reading the embedding configuration") as conn:
            self._config = await self._read_config(conn)
            return self._config

    async def set_embedding_config(self, config: EmbeddingConfig) -> None:
        async with self._write("recording the embedding configuration") as conn:
            recorded = await self._read_config(conn)
            if check_embedding_config(recorded, config):
                await conn.executemany(
                    "INSERT INTO kotonoha_meta (key, value) VALUES (?, ?)",
                    [
                        ("embedding_model", config.model),
                        ("embedding_dimension", str(config.dimension)),
                    ],
                )
            self._config = config

    # --- job leases -----------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, seconds: float) -> bool:
        check_text(name, "lease name")
        check_text(owner, "lease owner")
        now = utcnow()
        async with self._write(f"taking lease {name!r}") as conn:
            await conn.execute(
                "INSERT INTO job_leases (name, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at"
                " WHERE job_leases.expires_at < ? OR job_leases.owner = excluded.owner",
                (name, owner, _ts(now + timedelta(seconds=seconds)), _ts(now)),
            )
            row = await (
                await conn.execute("SELECT owner FROM job_leases WHERE name = ?", (name,))
            ).fetchone()
        return row is not None and row[0] == owner

    async def release_lease(self, name: str, owner: str) -> None:
        async with self._write(f"releasing lease {name!r}") as conn:
            await conn.execute("DELETE FROM job_leases WHERE name = ? AND owner = ?", (name, owner))

    # --- maintenance ----------------------------------------------------------------

    async def rebuild_vector_index(self) -> None:
        """Reload the in-memory vector cache from the stored vectors."""
        async with self._read("rebuilding the vector cache") as conn:
            if self._config is not None:
                self._cache = await self._load_cache(conn, self._config.dimension)

    async def stats(self) -> DatabaseStats:
        async with self._read("reading statistics") as conn:
            row = await (
                await conn.execute(
                    "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM messages),"
                    " (SELECT count(*) FROM knowledge_sources),"
                    " (SELECT count(*) FROM knowledge_chunks),"
                    " (SELECT count(*) FROM knowledge_chunks WHERE embedding IS NULL),"
                    " (SELECT max(version) FROM schema_migrations)"
                )
            ).fetchone()
            config = await self._read_config(conn)
            journal = await (await conn.execute("PRAGMA journal_mode")).fetchone()
        assert row is not None
        size = sum(
            p.stat().st_size
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
            if p.exists()
        )
        details: dict[str, Any] = {
            "sqlite_version": sqlite3.sqlite_version,
            "journal_mode": journal[0] if journal else "?",
            "vector_search": (
                "exact (numpy, float32 in-memory cache)"
                if self._cache_kind == "float32"
                else f"{self._cache_kind} in-memory cache ({SIMD_BACKEND}), exact float32 re-rank"
            ),
            "vector_cache": self._cache_kind,
        }
        if self._cache is not None:
            details["vector_cache_bytes"] = self._cache.nbytes
            details["vector_cache_rows"] = len(self._cache)
        return DatabaseStats(
            backend=self.backend_name,
            location=self.location,
            schema_version=int(row[5] or 0),
            sessions=row[0],
            messages=row[1],
            sources=row[2],
            chunks=row[3],
            pending_chunks=row[4],
            embedding=config,
            size_bytes=size,
            details=details,
        )
