"""SQLiteDatabase: the embedded default, on aiosqlite.

One long-lived connection (WAL, foreign keys, busy timeout, synchronous=FULL so an
acknowledged turn survives a power cut). Every operation runs under one asyncio
lock, so the statements of one transaction never interleave with another
coroutine's. Vectors are float32 BLOBs on disk and compact codes in memory
(``VectorCache``, int4 by default): a search shortlists by code score and re-ranks the
shortlist by exact float32 cosine read from the BLOBs, so similarities are exact. The
cache is updated only after a transaction commits and reloaded when another process
changed the file (``PRAGMA data_version``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import numpy as np

from kotonoha_bot.db import sqlite_path_from_url
from kotonoha_bot.db.base import (
    AsyncLifecycle,
    ReembedStatus,
    check_chunks,
    check_embedding_config,
    check_filters,
    check_ids,
    check_session,
    check_source,
    check_top_k,
    check_vector,
    config_from_meta,
)
from kotonoha_bot.db.sqlite_dashboard import SQLiteDashboard
from kotonoha_bot.db.sqlite_files import OURS, check_openable, create_private, translate
from kotonoha_bot.db.sqlite_memories import SQLiteMemories
from kotonoha_bot.db.sqlite_provenance import SQLiteProvenance
from kotonoha_bot.db.sqlite_values import dt as _dt
from kotonoha_bot.db.sqlite_values import ts as _ts
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.db.vector_cache import CacheKind, VectorCache, rerank
from kotonoha_bot.db.vector_kernels import SIMD_BACKEND
from kotonoha_bot.errors import (
    DatabaseError,
    ForeignDatabaseError,
    InvalidInputError,
    NotFoundError,
    SchemaError,
    SessionConflictError,
)
from kotonoha_bot.models import (
    ChatSession,
    DatabaseStats,
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Message,
    PendingChunk,
    SearchHit,
    SessionInfo,
    SourceStatus,
    Vector,
    utcnow,
)
from kotonoha_bot.text import (
    KeywordPlan,
    bm25_score,
    check_text,
    df_cap,
    keyword_document,
    keyword_plan,
    query_terms,
)

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE kotonoha_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

        CREATE TABLE sessions (
            session_key TEXT PRIMARY KEY,
            session_type TEXT NOT NULL
                CHECK (session_type IN ('mention', 'thread', 'eavesdrop', 'dm')),
            status TEXT NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'archived', 'closed')),
            guild_id INTEGER,
            channel_id INTEGER,
            thread_id INTEGER,
            user_id INTEGER,
            version INTEGER NOT NULL,
            message_count INTEGER NOT NULL DEFAULT 0,
            last_archived_message_index INTEGER NOT NULL DEFAULT -1,
            created_at TEXT NOT NULL,
            last_active_at TEXT NOT NULL
        );
        CREATE INDEX sessions_guild_idx ON sessions (guild_id, channel_id);
        CREATE INDEX sessions_active_idx ON sessions (status, last_active_at);

        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_key TEXT NOT NULL REFERENCES sessions (session_key) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
            content TEXT NOT NULL,
            author_id INTEGER,
            author_name TEXT,
            discord_message_id INTEGER,
            created_at TEXT NOT NULL,
            UNIQUE (session_key, seq)
        );
        CREATE INDEX messages_author_idx ON messages (author_id);

        CREATE TABLE knowledge_sources (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            guild_id INTEGER NOT NULL,
            channel_id INTEGER,
            source_type TEXT NOT NULL CHECK (source_type IN ('document', 'conversation')),
            uri TEXT NOT NULL,
            title TEXT NOT NULL,
            content_hash TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL CHECK (status IN ('pending', 'ready', 'failed')),
            metadata TEXT NOT NULL DEFAULT '{}',
            session_key TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (guild_id, uri)
        );
        CREATE INDEX knowledge_sources_status_idx ON knowledge_sources (status);

        CREATE TABLE knowledge_chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            source_id INTEGER NOT NULL REFERENCES knowledge_sources (id) ON DELETE CASCADE,
            guild_id INTEGER NOT NULL,
            channel_id INTEGER,
            chunk_index INTEGER NOT NULL,
            chunk_key TEXT NOT NULL,
            content TEXT NOT NULL,
            search_text TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            embedding BLOB,
            created_at TEXT NOT NULL,
            UNIQUE (source_id, chunk_key)
        );
        CREATE INDEX knowledge_chunks_scope_idx ON knowledge_chunks (guild_id, channel_id);
        CREATE INDEX knowledge_chunks_pending_idx ON knowledge_chunks (id)
            WHERE embedding IS NULL;

        CREATE VIRTUAL TABLE knowledge_chunks_fts USING fts5 (
            search_text,
            content = 'knowledge_chunks',
            content_rowid = 'id',
            tokenize = 'unicode61 remove_diacritics 0'
        );
        CREATE TRIGGER knowledge_chunks_fts_ins AFTER INSERT ON knowledge_chunks BEGIN
            INSERT INTO knowledge_chunks_fts (rowid, search_text)
            VALUES (new.id, new.search_text);
        END;
        CREATE TRIGGER knowledge_chunks_fts_del AFTER DELETE ON knowledge_chunks BEGIN
            INSERT INTO knowledge_chunks_fts (knowledge_chunks_fts, rowid, search_text)
            VALUES ('delete', old.id, old.search_text);
        END;
        CREATE TRIGGER knowledge_chunks_fts_upd AFTER UPDATE OF search_text
            ON knowledge_chunks BEGIN
            INSERT INTO knowledge_chunks_fts (knowledge_chunks_fts, rowid, search_text)
            VALUES ('delete', old.id, old.search_text);
            INSERT INTO knowledge_chunks_fts (rowid, search_text)
            VALUES (new.id, new.search_text);
        END;

        CREATE TABLE reembed_vectors (
            chunk_id INTEGER PRIMARY KEY REFERENCES knowledge_chunks (id) ON DELETE CASCADE,
            embedding BLOB NOT NULL
        );
        """,
    ),
    (
        2,
        "job leases",
        """
        CREATE TABLE job_leases (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at TEXT NOT NULL
        );
        """,
    ),
    (
        3,
        "provenance, explicit memories and usage",
        """
        -- Where each message is on Discord, and the turn it belongs to (see Message).
        ALTER TABLE messages ADD COLUMN channel_id INTEGER;
        ALTER TABLE messages ADD COLUMN turn_id INTEGER;
        CREATE INDEX messages_discord_idx ON messages (discord_message_id)
            WHERE discord_message_id IS NOT NULL;
        CREATE INDEX messages_turn_idx ON messages (session_key, turn_id)
            WHERE turn_id IS NOT NULL;
        CREATE INDEX messages_channel_idx ON messages (channel_id)
            WHERE channel_id IS NOT NULL;
        -- Older rows: a message was posted in its session's thread, else its channel;
        -- a reply belongs to the turn of the user message before it.
        UPDATE messages SET channel_id = (SELECT coalesce(s.thread_id, s.channel_id)
            FROM sessions s WHERE s.session_key = messages.session_key)
            WHERE discord_message_id IS NOT NULL;
        UPDATE messages SET turn_id = discord_message_id WHERE role = 'user';
        UPDATE messages SET turn_id = (SELECT p.discord_message_id FROM messages p
            WHERE p.session_key = messages.session_key AND p.seq < messages.seq
            AND p.role = 'user' ORDER BY p.seq DESC LIMIT 1)
            WHERE role = 'assistant';

        -- The Discord messages the bot sent as a reply (a long reply is several).
        CREATE TABLE message_refs (
            discord_message_id INTEGER PRIMARY KEY,
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            channel_id INTEGER NOT NULL
        );
        CREATE INDEX message_refs_message_idx ON message_refs (message_id);

        -- Provenance: the stored messages each conversation chunk was built from.
        CREATE TABLE chunk_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chunk_id INTEGER NOT NULL REFERENCES knowledge_chunks (id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            UNIQUE (chunk_id, message_id)
        );
        CREATE INDEX chunk_messages_message_idx ON chunk_messages (message_id);
        -- Chunks archived before this version: their window's messages by position.
        INSERT OR IGNORE INTO chunk_messages (chunk_id, message_id)
            SELECT c.id, m.id FROM knowledge_chunks c
            JOIN (SELECT id, session_key,
                         row_number() OVER (PARTITION BY session_key ORDER BY seq) - 1 AS idx
                  FROM messages) m
              ON m.session_key = json_extract(c.metadata, '$.session_key')
             AND m.idx BETWEEN json_extract(c.metadata, '$.first_index')
                           AND json_extract(c.metadata, '$.last_index')
            WHERE json_extract(c.metadata, '$.kind') IN ('conversation', 'summary')
              AND json_type(c.metadata, '$.first_index') = 'integer'
              AND json_type(c.metadata, '$.last_index') = 'integer'
            ORDER BY c.id, m.id;

        CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            guild_id INTEGER,
            user_id INTEGER NOT NULL,
            content TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX memories_owner_idx ON memories (guild_id, user_id, id);

        -- One row per UTC day, guild, user and model; 0 = no guild (DMs) / no user.
        CREATE TABLE llm_usage (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            day TEXT NOT NULL,
            guild_id INTEGER NOT NULL DEFAULT 0,
            user_id INTEGER NOT NULL DEFAULT 0,
            model TEXT NOT NULL,
            calls INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            UNIQUE (day, guild_id, user_id, model)
        );
        CREATE INDEX llm_usage_guild_idx ON llm_usage (guild_id, day);
        """,
    ),
]

LATEST_SCHEMA_VERSION = MIGRATIONS[-1][0]
#: Extra BEGIN IMMEDIATE attempts (each waits up to the busy timeout) before giving up.
_BUSY_RETRIES = 5


def _blob(vector: Vector) -> bytes:
    return vector.astype("<f4", copy=False).tobytes()


def _vec(blob: bytes) -> Vector:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


class SQLiteDatabase(SQLiteDashboard, SQLiteProvenance, SQLiteMemories, AsyncLifecycle):
    """The embedded backend: one file, one connection, exact vector search."""

    backend_name = "sqlite"
    capabilities: frozenset[str] = frozenset()

    def __init__(self, url: str | DatabaseURL, *, settings: Settings | None = None) -> None:
        self.path: Path = sqlite_path_from_url(url)
        self._busy_timeout_ms = settings.sqlite_busy_timeout_ms if settings else 5000
        self._cache_kind: CacheKind = settings.sqlite_vector_cache if settings else "int4"
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._cache: VectorCache | None = None
        self._cache_data_version: int | None = None
        self._config: EmbeddingConfig | None = None

    @property
    def location(self) -> str:
        return f"sqlite:///{self.path}"

    # --- lifecycle ------------------------------------------------------------------

    async def initialize(self) -> None:
        if self._conn is not None:
            return
        # Decide what the file is before SQLite touches it: a foreign or legacy file is
        # refused unchanged (no tables added, journal mode left alone), a new one is
        # created 0600 (its -wal and -shm inherit that mode).
        exists = await asyncio.to_thread(check_openable, self.path)
        if not exists:
            await asyncio.to_thread(create_private, self.path)
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise translate(self.path, "opening the database", exc) from None
        self._conn = conn
        try:
            async with self._lock, self._errors("opening the database"):
                await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                await self._check_is_database(conn)
                await conn.execute("PRAGMA journal_mode = WAL")
                await conn.execute("PRAGMA synchronous = FULL")
                await conn.execute("PRAGMA foreign_keys = ON")
                await self._migrate(conn)
                self._config = await self._read_config(conn)
        except BaseException:
            await conn.close()
            self._conn = None
            raise

    async def _check_is_database(self, conn: aiosqlite.Connection) -> None:
        """Read the schema once more on our own connection (the file may have changed)."""
        rows = await (await conn.execute("SELECT type, name FROM sqlite_master")).fetchall()
        tables = {str(r[1]) for r in rows if r[0] == "table"}
        if rows and not tables >= OURS:
            await asyncio.to_thread(check_openable, self.path)  # raises the precise error
            raise ForeignDatabaseError(f"{self.path} is not a kotonoha database; left unchanged")

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await self._begin(conn)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            row = await (
                await conn.execute("SELECT max(version) FROM schema_migrations")
            ).fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > LATEST_SCHEMA_VERSION:
                raise SchemaError(
                    f"{self.path} has schema version {current}, newer than this kotonoha-bot"
                    f" understands ({LATEST_SCHEMA_VERSION}); upgrade kotonoha-bot"
                )
            for version, name, sql in MIGRATIONS:
                if version <= current:
                    continue
                for statement in _split_sql(sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, _ts(utcnow())),
                )
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._cache = None

    # --- plumbing -------------------------------------------------------------------

    def _c(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise DatabaseError("the database is not open (use `async with open_database(...)`)")
        return self._conn

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise translate(self.path, what, exc) from None

    @asynccontextmanager
    async def _read(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._errors(what):
            yield self._c()

    @asynccontextmanager
    async def _write(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (BEGIN IMMEDIATE) under the lock; rolled back on any error."""
        async with self._lock, self._errors(what):
            conn = self._c()
            await self._begin(conn)
            try:
                yield conn
            except BaseException:
                await _rollback(conn)
                raise
            await conn.execute("COMMIT")

    async def _begin(self, conn: aiosqlite.Connection) -> None:
        """BEGIN IMMEDIATE, retried while another process holds the write lock.

        Nothing has run yet, so a retry is always safe; a long writer elsewhere (a big
        ingest) costs this one a wait, not an error, for up to ``_BUSY_RETRIES`` more
        busy timeouts.
        """
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                await conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (5, 6) or attempt == _BUSY_RETRIES:  # SQLITE_BUSY, SQLITE_LOCKED
                    raise
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    async def _read_config(self, conn: aiosqlite.Connection) -> EmbeddingConfig | None:
        rows = await (await conn.execute("SELECT key, value FROM kotonoha_meta")).fetchall()
        return config_from_meta({r[0]: r[1] for r in rows}, "embedding")

    async def schema_version(self) -> int:
        async with self._read("reading the schema version") as conn:
            row = await (
                await conn.execute("SELECT max(version) FROM schema_migrations")
            ).fetchone()
            return int(row[0]) if row and row[0] is not None else 0

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

    def _require_dim(
        self, chunks: Iterable[KnowledgeChunk], config: EmbeddingConfig | None, where: str
    ) -> None:
        if config is None and any(c.embedding is not None for c in chunks):
            raise InvalidInputError(
                f"{where}: no embedding model recorded in this database yet;"
                " call set_embedding_config before writing vectors"
            )

    # --- knowledge ------------------------------------------------------------------

    async def save_source(
        self, source: KnowledgeSource, chunks: Sequence[KnowledgeChunk]
    ) -> KnowledgeSource:
        where = f"source {source.uri!r}"
        async with self._write(f"saving {where}") as conn:
            config = await self._read_config(conn)
            check_source(source, chunks, config.dimension if config else None)
            self._require_dim(chunks, config, where)
            self._check_chunk_scope(source.guild_id, chunks, where)
            now = _ts(utcnow())
            status: SourceStatus = (
                "ready" if all(c.embedding is not None for c in chunks) else "pending"
            )
            existing = await (
                await conn.execute(
                    "SELECT id, created_at FROM knowledge_sources WHERE guild_id = ? AND uri = ?",
                    (source.guild_id, source.uri),
                )
            ).fetchone()
            removed: list[int] = []
            if existing is not None:
                source_id, created = int(existing[0]), existing[1]
                removed = [
                    r[0]
                    for r in await (
                        await conn.execute(
                            "SELECT id FROM knowledge_chunks WHERE source_id = ?", (source_id,)
                        )
                    ).fetchall()
                ]
                await conn.execute("DELETE FROM knowledge_chunks WHERE source_id = ?", (source_id,))
                await conn.execute(
                    "UPDATE knowledge_sources SET channel_id = ?, source_type = ?, title = ?,"
                    " content_hash = ?, status = ?, metadata = ?, session_key = ?, updated_at = ?"
                    " WHERE id = ?",
                    (
                        source.channel_id,
                        source.source_type,
                        source.title,
                        source.content_hash,
                        status,
                        _json(source.metadata),
                        source.session_key,
                        now,
                        source_id,
                    ),
                )
            else:
                created = now
                cur = await conn.execute(
                    "INSERT INTO knowledge_sources (guild_id, channel_id, source_type, uri, title,"
                    " content_hash, status, metadata, session_key, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        source.guild_id,
                        source.channel_id,
                        source.source_type,
                        source.uri,
                        source.title,
                        source.content_hash,
                        status,
                        _json(source.metadata),
                        source.session_key,
                        now,
                        now,
                    ),
                )
                assert cur.lastrowid is not None
                source_id = int(cur.lastrowid)
            added = await self._insert_chunks(conn, source_id, source, chunks, now)
        self._cache_remove(removed)
        self._cache_add(added)
        return KnowledgeSource(
            guild_id=source.guild_id,
            uri=source.uri,
            title=source.title,
            source_type=source.source_type,
            channel_id=source.channel_id,
            content_hash=source.content_hash,
            status=status,
            metadata=dict(source.metadata),
            session_key=source.session_key,
            source_id=source_id,
            created_at=_dt(created),
            updated_at=_dt(now),
        )

    @staticmethod
    def _check_chunk_scope(guild_id: int, chunks: Sequence[KnowledgeChunk], where: str) -> None:
        for c in chunks:
            if c.guild_id is not None and c.guild_id != guild_id:
                raise InvalidInputError(
                    f"{where} chunk {c.chunk_key!r}: guild_id {c.guild_id} differs from the"
                    f" source's {guild_id}"
                )

    async def _insert_chunks(
        self,
        conn: aiosqlite.Connection,
        source_id: int,
        source: KnowledgeSource,
        chunks: Sequence[KnowledgeChunk],
        now: str,
    ) -> list[tuple[int, int, int | None, Vector]]:
        """Insert chunks (skipping existing keys); return the embedded ones for the cache."""
        added: list[tuple[int, int, int | None, Vector]] = []
        missing = await self._missing_messages(conn, chunks)
        for c in chunks:
            if missing and not missing.isdisjoint(c.message_ids):
                continue  # a message of its window was deleted meanwhile: never store it
            channel = c.channel_id if c.channel_id is not None else source.channel_id
            vec = None if c.embedding is None else check_vector(c.embedding, None, "chunk")
            cur = await conn.execute(
                "INSERT INTO knowledge_chunks (source_id, guild_id, channel_id, chunk_index,"
                " chunk_key, content, search_text, metadata, embedding, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source_id, chunk_key) DO NOTHING",
                (
                    source_id,
                    source.guild_id,
                    channel,
                    c.chunk_index,
                    c.chunk_key,
                    c.content,
                    keyword_document(c.content),
                    _json(c.metadata),
                    None if vec is None else _blob(vec),
                    now,
                ),
            )
            if cur.rowcount and c.message_ids:
                assert cur.lastrowid is not None
                await self._link_chunk(conn, int(cur.lastrowid), c.message_ids)
            if cur.rowcount and vec is not None:
                assert cur.lastrowid is not None
                added.append((int(cur.lastrowid), source.guild_id, channel, vec))
            elif cur.rowcount:
                added.append((-1, 0, None, np.zeros(0, np.float32)))  # counted, not cached
        return added

    async def ensure_source(self, source: KnowledgeSource) -> KnowledgeSource:
        check_source(source, [], None)
        async with self._write(f"creating source {source.uri!r}") as conn:
            now = _ts(utcnow())
            await conn.execute(
                "INSERT INTO knowledge_sources (guild_id, channel_id, source_type, uri, title,"
                " content_hash, status, metadata, session_key, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'ready', ?, ?, ?, ?)"
                " ON CONFLICT (guild_id, uri) DO NOTHING",
                (
                    source.guild_id,
                    source.channel_id,
                    source.source_type,
                    source.uri,
                    source.title,
                    source.content_hash,
                    _json(source.metadata),
                    source.session_key,
                    now,
                    now,
                ),
            )
            row = await (
                await conn.execute(
                    f"SELECT {self._SOURCE_COLS} FROM knowledge_sources"
                    " WHERE guild_id = ? AND uri = ?",
                    (source.guild_id, source.uri),
                )
            ).fetchone()
        assert row is not None
        return self._source(row)

    async def add_chunks(self, source_id: int, chunks: Sequence[KnowledgeChunk]) -> int:
        check_ids("add_chunks", source_id)
        async with self._write(f"adding chunks to source {source_id}") as conn:
            row = await (
                await conn.execute(
                    "SELECT guild_id, channel_id, uri, title FROM knowledge_sources WHERE id = ?",
                    (source_id,),
                )
            ).fetchone()
            if row is None:
                raise NotFoundError(f"knowledge source {source_id} does not exist")
            source = KnowledgeSource(guild_id=row[0], channel_id=row[1], uri=row[2], title=row[3])
            where = f"source {source.uri!r}"
            config = await self._read_config(conn)
            check_chunks(chunks, config.dimension if config else None, where)
            self._require_dim(chunks, config, where)
            self._check_chunk_scope(source.guild_id, chunks, where)
            now = _ts(utcnow())
            added = await self._insert_chunks(conn, source_id, source, chunks, now)
            if added:
                await self._refresh_status(conn, [source_id], now)
        self._cache_add(added)
        return len(added)

    async def set_source_hash(self, source_id: int, content_hash: str) -> bool:
        check_ids("set_source_hash", source_id)
        check_text(content_hash, "content_hash")
        async with self._write(f"recording the hash of source {source_id}") as conn:
            cur = await conn.execute(
                "UPDATE knowledge_sources SET content_hash = ?, updated_at = ? WHERE id = ?",
                (content_hash, _ts(utcnow()), source_id),
            )
            return cur.rowcount > 0

    @staticmethod
    async def _refresh_status(
        conn: aiosqlite.Connection, source_ids: Iterable[int], now: str
    ) -> None:
        await conn.executemany(
            "UPDATE knowledge_sources SET updated_at = ?, status = CASE WHEN EXISTS"
            " (SELECT 1 FROM knowledge_chunks WHERE source_id = ? AND embedding IS NULL)"
            " THEN 'pending' ELSE 'ready' END WHERE id = ?",
            [(now, sid, sid) for sid in source_ids],
        )

    _SOURCE_COLS = (
        "id, guild_id, channel_id, source_type, uri, title, content_hash, status, metadata,"
        " session_key, created_at, updated_at"
    )

    @staticmethod
    def _source(r: Sequence[Any]) -> KnowledgeSource:
        return KnowledgeSource(
            source_id=r[0],
            guild_id=r[1],
            channel_id=r[2],
            source_type=r[3],
            uri=r[4],
            title=r[5],
            content_hash=r[6],
            status=r[7],
            metadata=json.loads(r[8]),
            session_key=r[9],
            created_at=_dt(r[10]),
            updated_at=_dt(r[11]),
        )

    async def get_source(self, source_id: int) -> KnowledgeSource | None:
        check_ids("get_source", source_id)
        async with self._read(f"reading source {source_id}") as conn:
            row = await (
                await conn.execute(
                    f"SELECT {self._SOURCE_COLS} FROM knowledge_sources WHERE id = ?", (source_id,)
                )
            ).fetchone()
        return None if row is None else self._source(row)

    async def find_source(self, guild_id: int, uri: str) -> KnowledgeSource | None:
        check_ids("find_source", guild_id)
        async with self._read(f"finding source {uri!r}") as conn:
            row = await (
                await conn.execute(
                    f"SELECT {self._SOURCE_COLS} FROM knowledge_sources"
                    " WHERE guild_id = ? AND uri = ?",
                    (guild_id, uri),
                )
            ).fetchone()
        return None if row is None else self._source(row)

    async def list_sources(
        self, *, guild_id: int | None = None, status: str | None = None
    ) -> list[KnowledgeSource]:
        check_ids("list_sources", guild_id)
        where: list[str] = []
        params: list[Any] = []
        if guild_id is not None:
            where.append("guild_id = ?")
            params.append(guild_id)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = (
            f"SELECT {self._SOURCE_COLS} FROM knowledge_sources"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id"
        )
        async with self._read("listing sources") as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        return [self._source(r) for r in rows]

    async def delete_source(self, source_id: int) -> bool:
        check_ids("delete_source", source_id)
        async with self._write(f"deleting source {source_id}") as conn:
            removed = [
                r[0]
                for r in await (
                    await conn.execute(
                        "SELECT id FROM knowledge_chunks WHERE source_id = ?", (source_id,)
                    )
                ).fetchall()
            ]
            cur = await conn.execute("DELETE FROM knowledge_sources WHERE id = ?", (source_id,))
            existed = cur.rowcount > 0
        self._cache_remove(removed)
        return existed

    async def list_chunks(self, source_id: int) -> list[KnowledgeChunk]:
        check_ids("list_chunks", source_id)
        async with self._read(f"listing chunks of source {source_id}") as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, source_id, guild_id, channel_id, chunk_index, chunk_key, content,"
                    " metadata, embedding FROM knowledge_chunks WHERE source_id = ?"
                    " ORDER BY chunk_index, id",
                    (source_id,),
                )
            ).fetchall()
            links = await self._chunk_message_ids(conn, [int(r[0]) for r in rows])
        return [
            KnowledgeChunk(
                chunk_id=r[0],
                source_id=r[1],
                guild_id=r[2],
                channel_id=r[3],
                chunk_index=r[4],
                chunk_key=r[5],
                content=r[6],
                metadata=json.loads(r[7]),
                embedding=None if r[8] is None else _vec(r[8]),
                message_ids=links.get(int(r[0]), ()),
            )
            for r in rows
        ]

    async def _chunks_to_embed(self, what: str, where: str, limit: int) -> list[PendingChunk]:
        """Chunks matching ``where`` (SQL over alias ``c``), by id: work for an embedder."""
        async with self._read(what) as conn:
            rows = await (
                await conn.execute(
                    "SELECT c.id, c.source_id, c.content FROM knowledge_chunks c"
                    f" WHERE {where} ORDER BY c.id LIMIT ?",
                    (limit,),
                )
            ).fetchall()
        return [PendingChunk(chunk_id=r[0], source_id=r[1], content=r[2]) for r in rows]

    async def pending_chunks(self, limit: int = 100) -> list[PendingChunk]:
        return await self._chunks_to_embed(
            "listing chunks awaiting embeddings", "c.embedding IS NULL", limit
        )

    async def set_chunk_embeddings(self, items: Sequence[tuple[int, Vector]]) -> int:
        check_ids("set_chunk_embeddings", *(i for i, _ in items))
        async with self._write("storing embeddings") as conn:
            config = await self._read_config(conn)
            if config is None and items:
                raise InvalidInputError(
                    "no embedding model recorded in this database yet;"
                    " call set_embedding_config before writing vectors"
                )
            dim = config.dimension if config else None
            checked = [(int(cid), check_vector(v, dim, f"chunk {cid}")) for cid, v in items]
            updated: list[tuple[int, int, int | None, Vector]] = []
            sources: set[int] = set()
            for cid, vec in checked:
                row = await (
                    await conn.execute(
                        "UPDATE knowledge_chunks SET embedding = ? WHERE id = ?"
                        " RETURNING source_id, guild_id, channel_id",
                        (_blob(vec), cid),
                    )
                ).fetchone()
                if row is not None:
                    sources.add(int(row[0]))
                    updated.append((cid, int(row[1]), row[2], vec))
            await self._refresh_status(conn, sorted(sources), _ts(utcnow()))
        self._cache_add(updated)
        return len(updated)

    # --- search ---------------------------------------------------------------------

    async def similarity_search(
        self,
        query_embedding: Sequence[float] | Vector,
        *,
        guild_id: int,
        channel_id: int | None = None,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        min_similarity: float | None = None,
    ) -> list[SearchHit]:
        check_ids("similarity_search", guild_id, channel_id)
        check_top_k(top_k)
        wanted = check_filters(filters)
        async with self._read("searching knowledge") as conn:
            config = self._config
            query = check_vector(query_embedding, config.dimension if config else None, "query")
            if config is None:
                return []
            cache = await self._ensure_cache(conn, config)
            allowed: set[int] | None = None
            if wanted:
                clause, params = _filter_sql(wanted)
                sql = (
                    "SELECT id FROM knowledge_chunks WHERE guild_id = ?"
                    + (" AND channel_id = ?" if channel_id is not None else "")
                    + f" AND embedding IS NOT NULL AND {clause}"
                )
                scope = [guild_id] + ([channel_id] if channel_id is not None else [])
                allowed = {r[0] for r in await (await conn.execute(sql, scope + params)).fetchall()}
            shortlist = await asyncio.to_thread(
                cache.shortlist, query, guild_id, channel_id, top_k, allowed
            )
            if shortlist.exact:
                ranked = shortlist.ranked
                rows = await self._hit_rows(conn, [cid for cid, _ in ranked])
            else:
                # One read for the shortlist: its stored vectors for the exact re-rank and
                # the columns of the hits that survive it.
                rows = await self._hit_rows(
                    conn, [cid for cid, _ in shortlist.ranked], with_embedding=True
                )
                ranked = rerank(
                    query, [(cid, r[9]) for cid, r in rows.items() if r[9] is not None], top_k
                )
            if min_similarity is not None:
                ranked = [(cid, s) for cid, s in ranked if s >= min_similarity]
            return self._make_hits(rows, ranked, similarity=True)

    async def keyword_search(
        self,
        query: str,
        *,
        guild_id: int,
        channel_id: int | None = None,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
    ) -> list[SearchHit]:
        check_ids("keyword_search", guild_id, channel_id)
        check_top_k(top_k)
        check_text(query, "keyword query")
        wanted = check_filters(filters)
        terms = query_terms(query)
        if not terms:
            return []
        scope = " AND c.guild_id = ?" + (" AND c.channel_id = ?" if channel_id is not None else "")
        params: list[Any] = [guild_id] + ([channel_id] if channel_id is not None else [])
        if wanted:
            clause, fparams = _filter_sql(wanted, "c.metadata")
            scope += f" AND {clause}"
            params += fparams
        # CROSS JOIN keeps the full-text index first: left to itself the planner walks
        # the guild's rows and probes FTS5 once per row (0.5 s per term at 20k chunks).
        matching = (
            "SELECT c.id, c.search_text FROM knowledge_chunks_fts"
            " CROSS JOIN knowledge_chunks c ON c.id = knowledge_chunks_fts.rowid"
            " WHERE knowledge_chunks_fts MATCH ?" + scope
        )
        async with self._read("keyword search") as conn:
            # The scope's statistics (the same numbers PostgreSQL computes): its chunk
            # count and each term's document frequency, then the shared plan and score.
            count_sql = "SELECT count(*) FROM knowledge_chunks c WHERE 1 = 1" + scope
            row = await (await conn.execute(count_sql, params)).fetchone()
            n_docs = int(row[0]) if row else 0
            df: dict[str, int] = {}
            for term in terms:
                cursor = await conn.execute(
                    f"SELECT count(*) FROM ({matching} LIMIT ?)",
                    [_fts_phrase(term), *params, df_cap(n_docs)],
                )
                row = await cursor.fetchone()
                df[term] = int(row[0]) if row else 0
            plan = keyword_plan(terms, df, n_docs)
            if plan is None:
                return []
            match = " OR ".join(_fts_phrase(t) for t in plan.terms)
            rows = list(await (await conn.execute(matching, [match, *params])).fetchall())
            if len(rows) > KEYWORD_THREAD_ROWS:  # scoring thousands of rows: off the loop
                scored = await asyncio.to_thread(_bm25_rows, plan, rows)
            else:
                scored = _bm25_rows(plan, rows)
            scored.sort(key=lambda x: (-x[1], x[0]))
            scored = scored[:top_k]
            hits = await self._hits(
                conn, [(cid, score) for cid, score, _ in scored], similarity=False
            )
            cover = {cid: cov for cid, _, cov in scored}
            return [dataclasses.replace(h, coverage=cover[h.chunk_id]) for h in hits]

    async def _hits(
        self, conn: aiosqlite.Connection, ranked: list[tuple[int, float]], *, similarity: bool
    ) -> list[SearchHit]:
        rows = await self._hit_rows(conn, [cid for cid, _ in ranked])
        return self._make_hits(rows, ranked, similarity=similarity)

    @staticmethod
    async def _hit_rows(
        conn: aiosqlite.Connection, ids: list[int], *, with_embedding: bool = False
    ) -> dict[int, Sequence[Any]]:
        """The hit columns of these chunks by id (and, last, the stored vector)."""
        if not ids:
            return {}
        rows = await (
            await conn.execute(
                "SELECT c.id, c.source_id, c.content, c.guild_id, c.channel_id, c.metadata,"
                " c.chunk_index, s.title, s.uri"
                + (", c.embedding" if with_embedding else "")
                + " FROM knowledge_chunks c JOIN knowledge_sources s ON s.id = c.source_id"
                f" WHERE c.id IN ({','.join('?' * len(ids))})",
                ids,
            )
        ).fetchall()
        return {int(r[0]): r for r in rows}

    @staticmethod
    def _make_hits(
        by_id: Mapping[int, Sequence[Any]], ranked: list[tuple[int, float]], *, similarity: bool
    ) -> list[SearchHit]:
        hits = []
        for cid, score in ranked:
            r = by_id.get(cid)
            if r is None:
                continue
            hits.append(
                SearchHit(
                    chunk_id=r[0],
                    source_id=r[1],
                    content=r[2],
                    score=score,
                    guild_id=r[3],
                    channel_id=r[4],
                    metadata=json.loads(r[5]),
                    chunk_index=r[6],
                    similarity=score if similarity else None,
                    source_title=r[7],
                    source_uri=r[8],
                )
            )
        return hits

    # --- the vector cache -----------------------------------------------------------

    async def _ensure_cache(
        self, conn: aiosqlite.Connection, config: EmbeddingConfig
    ) -> VectorCache:
        version_row = await (await conn.execute("PRAGMA data_version")).fetchone()
        data_version = int(version_row[0]) if version_row else 0
        if (
            self._cache is not None
            and self._cache.dimension == config.dimension
            and self._cache_data_version == data_version
        ):
            return self._cache
        # First search, or another process committed to the file: (re)load.
        self._config = await self._read_config(conn)
        config = self._config or config
        self._cache = await self._load_cache(conn, config.dimension)
        self._cache_data_version = data_version
        return self._cache

    async def _load_cache(self, conn: aiosqlite.Connection, dim: int) -> VectorCache:
        cache = VectorCache(dim, self._cache_kind)
        # Exact room per scope up front: no growth slack in a freshly loaded cache.
        scopes = await (
            await conn.execute(
                "SELECT guild_id, channel_id, count(*) FROM knowledge_chunks"
                " WHERE embedding IS NOT NULL GROUP BY guild_id, channel_id"
            )
        ).fetchall()
        for guild_id, channel_id, rows in scopes:
            cache.reserve(int(guild_id), channel_id, int(rows))
        cursor = await conn.execute(
            "SELECT id, guild_id, channel_id, embedding FROM knowledge_chunks"
            " WHERE embedding IS NOT NULL ORDER BY id"
        )
        while rows := await cursor.fetchmany(4096):
            good = [r for r in rows if len(r[3]) == dim * 4]
            if not good:
                continue
            ids = np.fromiter((r[0] for r in good), dtype=np.int64, count=len(good))
            guilds = np.fromiter((r[1] for r in good), dtype=np.int64, count=len(good))
            matrix = np.frombuffer(b"".join(r[3] for r in good), dtype="<f4").reshape(
                len(good), dim
            )
            cache.put_many(ids, guilds, [r[2] for r in good], matrix.astype(np.float32), new=True)
        return cache

    def _cache_add(self, rows: Iterable[tuple[int, int, int | None, Vector]]) -> None:
        if self._cache is None:
            return
        dim = self._cache.dimension
        good = [r for r in rows if r[0] >= 0 and r[3].shape[0] == dim]
        if not good:
            return
        self._cache.put_many(
            np.fromiter((r[0] for r in good), dtype=np.int64, count=len(good)),
            np.fromiter((r[1] for r in good), dtype=np.int64, count=len(good)),
            [r[2] for r in good],
            np.stack([r[3] for r in good]).astype(np.float32, copy=False),
        )

    def _cache_remove(self, chunk_ids: Iterable[int]) -> None:
        if self._cache is None:
            return
        self._cache.remove_many(chunk_ids)

    # --- re-embedding ---------------------------------------------------------------

    async def _reembed_target(self, conn: aiosqlite.Connection) -> EmbeddingConfig | None:
        rows = await (
            await conn.execute(
                "SELECT key, value FROM kotonoha_meta"
                " WHERE key IN ('reembed_model', 'reembed_dimension')"
            )
        ).fetchall()
        return config_from_meta({r[0]: r[1] for r in rows}, "reembed")

    async def begin_reembed(self, target: EmbeddingConfig) -> None:
        async with self._write("starting a re-embedding") as conn:
            check_embedding_config(None, target)
            current = await self._read_config(conn)
            if current == target:
                raise InvalidInputError(
                    f"the database already uses {target.model!r} ({target.dimension} dims)"
                )
            running = await self._reembed_target(conn)
            if running is not None and running != target:
                await conn.execute("DELETE FROM reembed_vectors")
            await conn.executemany(
                "INSERT OR REPLACE INTO kotonoha_meta (key, value) VALUES (?, ?)",
                [("reembed_model", target.model), ("reembed_dimension", str(target.dimension))],
            )

    async def reembed_todo(self, limit: int = 100) -> list[PendingChunk]:
        return await self._chunks_to_embed(
            "listing chunks to re-embed",
            "NOT EXISTS (SELECT 1 FROM reembed_vectors r WHERE r.chunk_id = c.id)",
            limit,
        )

    async def store_reembed(self, items: Sequence[tuple[int, Vector]]) -> int:
        check_ids("store_reembed", *(i for i, _ in items))
        async with self._write("storing re-embedded vectors") as conn:
            target = await self._reembed_target(conn)
            if target is None:
                raise InvalidInputError("no re-embedding is running (call begin_reembed first)")
            checked = [(int(c), check_vector(v, target.dimension, f"chunk {c}")) for c, v in items]
            cur = await conn.executemany(
                "INSERT OR REPLACE INTO reembed_vectors (chunk_id, embedding)"
                " SELECT ?, ? WHERE EXISTS (SELECT 1 FROM knowledge_chunks WHERE id = ?)",
                [(c, _blob(v), c) for c, v in checked],
            )
            return max(cur.rowcount, 0)

    async def reembed_status(self) -> ReembedStatus | None:
        async with self._read("reading re-embedding progress") as conn:
            target = await self._reembed_target(conn)
            if target is None:
                return None
            row = await (
                await conn.execute(
                    "SELECT (SELECT count(*) FROM reembed_vectors),"
                    " (SELECT count(*) FROM knowledge_chunks)"
                )
            ).fetchone()
        assert row is not None
        return ReembedStatus(target=target, done=int(row[0]), total=int(row[1]))

    async def finish_reembed(self) -> EmbeddingConfig:
        async with self._write("switching to the re-embedded vectors") as conn:
            target = await self._reembed_target(conn)
            if target is None:
                raise InvalidInputError("no re-embedding is running")
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM knowledge_chunks c WHERE NOT EXISTS"
                    " (SELECT 1 FROM reembed_vectors r WHERE r.chunk_id = c.id)"
                )
            ).fetchone()
            missing = int(row[0]) if row else 0
            if missing:
                raise InvalidInputError(
                    f"{missing} chunks have no vector for {target.model!r} yet;"
                    " run `kotonoha kb reembed` to finish"
                )
            await conn.execute(
                "UPDATE knowledge_chunks SET embedding ="
                " (SELECT embedding FROM reembed_vectors r WHERE r.chunk_id = knowledge_chunks.id)"
            )
            await conn.execute("DELETE FROM reembed_vectors")
            await conn.execute(
                "DELETE FROM kotonoha_meta WHERE key IN ('reembed_model', 'reembed_dimension')"
            )
            await conn.executemany(
                "INSERT OR REPLACE INTO kotonoha_meta (key, value) VALUES (?, ?)",
                [("embedding_model", target.model), ("embedding_dimension", str(target.dimension))],
            )
            await self._refresh_all_status(conn)
        self._config = target
        self._cache = None  # reloaded with the new vectors on the next search
        return target

    @staticmethod
    async def _refresh_all_status(conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "UPDATE knowledge_sources SET status = CASE WHEN EXISTS (SELECT 1 FROM"
            " knowledge_chunks c WHERE c.source_id = knowledge_sources.id AND c.embedding"
            " IS NULL) THEN 'pending' ELSE 'ready' END"
        )

    async def abort_reembed(self) -> None:
        async with self._write("aborting the re-embedding") as conn:
            await conn.execute("DELETE FROM reembed_vectors")
            await conn.execute(
                "DELETE FROM kotonoha_meta WHERE key IN ('reembed_model', 'reembed_dimension')"
            )

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


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open: SQLite has already undone it after some errors
    (a full disk), and a second ROLLBACK would hide the real error behind "no transaction"."""
    if conn.in_transaction:
        await conn.execute("ROLLBACK")


#: Keyword candidates scored in a worker thread above this many rows (~50 ms of Python).
KEYWORD_THREAD_ROWS = 1000


def _bm25_rows(plan: KeywordPlan, rows: Iterable[Any]) -> list[tuple[int, float, float]]:
    """(id, BM25, coverage) of (id, search_text) rows, by the shared rule in text.py.

    Term counts come from ``str.count`` on the token string with every separator
    doubled (so adjacent equal tokens are each counted), not from splitting it: at
    thousands of candidate rows that is several times faster and gives the same tf.
    """
    docs = [(int(cid), text) for cid, text in rows]
    lengths = [text.count(" ") + 1 for _, text in docs]
    avg_len = sum(lengths) / max(len(docs), 1)
    needles = [f" {t} " for t in plan.terms]
    scored = []
    for (cid, text), length in zip(docs, lengths, strict=True):
        doubled = " " + text.replace(" ", "  ") + " "
        tf = {t: doubled.count(n) for t, n in zip(plan.terms, needles, strict=True)}
        score, coverage = bm25_score(plan, tf, length, avg_len)
        if score > 0:
            scored.append((cid, score, coverage))
    return scored


def _fts_phrase(token: str) -> str:
    """One keyword token as an FTS5 phrase (quotes doubled), so no token is an operator."""
    return '"' + token.replace('"', '""') + '"'


def _split_sql(script: str) -> list[str]:
    """Split a migration script into statements (triggers keep their inner semicolons)."""
    statements, buf = [], []
    for line in script.splitlines():
        buf.append(line)
        joined = "\n".join(buf).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            statements.append(joined)
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        statements.append(rest)
    return statements


def _filter_sql(
    wanted: Mapping[str, list[str | int | float | bool]], column: str = "metadata"
) -> tuple[str, list[Any]]:
    """SQL for JSON-type-sensitive equality/IN on top-level metadata keys."""
    clauses: list[str] = []
    params: list[Any] = []
    for key, values in wanted.items():
        path = '$."' + key + '"'
        alts = []
        for v in values:
            if isinstance(v, bool):
                alts.append(f"json_type({column}, ?) = ?")
                params += [path, "true" if v else "false"]
            elif isinstance(v, int | float):
                alts.append(
                    f"(json_type({column}, ?) IN ('integer', 'real')"
                    f" AND json_extract({column}, ?) = ?)"
                )
                params += [path, path, v]
            else:
                alts.append(f"(json_type({column}, ?) = 'text' AND json_extract({column}, ?) = ?)")
                params += [path, path, v]
        clauses.append("(" + " OR ".join(alts) + ")")
    return " AND ".join(clauses), params
