"""PostgreSQLDatabase: asyncpg pool + pgvector (HNSW / IVFFlat, cosine), JSONB, GIN FTS.

Every operation borrows its own pooled connection (never shared by two coroutines) and
runs in one transaction when it writes. Vectors travel in pgvector's binary format: the
codec is registered on every pool connection in ``init``. Driver errors are translated
at this edge: connection problems become ``DatabaseUnavailableError``, the rest
``DatabaseError``; messages are redacted so a password in the URL never shows.

An operation that finds its connection dead (server restarted, backend terminated) is
retried once on a fresh connection, unless the connection died while committing
(then the outcome is unknown and the caller is told so).

Vector search (rules and their measurements in ``db/postgres/search_plan.py``): small scopes
(at most ``exact_max_rows(dimension)`` rows after the guild, channel and metadata
filters) are searched exactly; larger ones through the approximate index (by default
HNSW over a halfvec copy of the normalised vector) with pgvector 0.8 iterative scans
and a re-sort by the exact float32 distance, falling back to an exact scan if the index
returns fewer rows than asked for. Searches follow the index that exists (its
definition is re-read with the scope sizes), so a database indexed by an older version
keeps working until ``rebuild_vector_index`` builds the configured one.

The class is assembled from mixins, one concern each: ``connection.py`` (pools,
retries, typed errors), ``index.py`` (embedding config, ANN index), ``knowledge.py``
(sources, chunks), ``search.py`` (vector and keyword search), ``provenance.py``
(edits and deletes that follow Discord, forget), ``memories.py`` (memories, usage),
``dashboard.py`` (the operator's pages);
sessions, re-embedding, leases and stats are here. Schema: ``schema.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db.checks import (
    check_embedding_config,
    check_ids,
    check_limit,
    check_session,
    check_vector,
)
from kotonoha_bot.db.contract import (
    ReembedStatus,
)
from kotonoha_bot.db.postgres.connection import (
    _SESSION_COLS,
    MAINTENANCE_TIMEOUT_SECONDS,
    Conn,
    _pgvec,
)
from kotonoha_bot.db.postgres.dashboard import PostgresDashboard
from kotonoha_bot.db.postgres.index import PostgresIndex
from kotonoha_bot.db.postgres.knowledge import PostgresKnowledge
from kotonoha_bot.db.postgres.memories import PostgresMemories
from kotonoha_bot.db.postgres.provenance import PostgresProvenance
from kotonoha_bot.db.postgres.schema import (
    ANN_INDEX_NAME,
    SCHEMA_LOCK_KEY,
)
from kotonoha_bot.db.postgres.search import PostgresSearch
from kotonoha_bot.db.postgres.search_plan import (
    IndexPlan,
    exact_max_rows,
)
from kotonoha_bot.db.postgres.sql import Params
from kotonoha_bot.db.tables import SOURCE_STATUS_SQL
from kotonoha_bot.errors import (
    InvalidInputError,
    SessionConflictError,
)
from kotonoha_bot.models import (
    ChatSession,
    DatabaseStats,
    EmbeddingConfig,
    Message,
    PendingChunk,
    SessionInfo,
    Vector,
)
from kotonoha_bot.text import (
    check_text,
    human_size,
)

if TYPE_CHECKING:
    pass


class PostgreSQLDatabase(
    PostgresDashboard,
    PostgresSearch,
    PostgresKnowledge,
    PostgresProvenance,
    PostgresMemories,
    PostgresIndex,
):
    """The server backend: asyncpg pool, pgvector ANN index, JSONB filters, GIN full text."""

    # --- sessions -------------------------------------------------------------

    async def save_session(self, session: ChatSession) -> None:
        check_session(session)
        key = session.session_key

        async def body(conn: Conn) -> None:
            row = await conn.fetchrow(
                "SELECT version, message_count,"
                " (SELECT coalesce(max(seq), -1) FROM messages WHERE session_key = $1) AS max_seq"
                " FROM sessions WHERE session_key = $1 FOR UPDATE",
                key,
            )
            if session.version == 0:
                if row is not None:
                    raise SessionConflictError(
                        f"session {key!r} already exists (stored version {row['version']});"
                        " load it and append instead"
                    )
                inserted = await conn.fetchval(
                    "INSERT INTO sessions (session_key, session_type, status, guild_id,"
                    " channel_id, thread_id, user_id, version, message_count,"
                    " last_archived_message_index, created_at, last_active_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9, $10, $11)"
                    " ON CONFLICT (session_key) DO NOTHING RETURNING 1",
                    key,
                    session.session_type,
                    session.status,
                    session.guild_id,
                    session.channel_id,
                    session.thread_id,
                    session.user_id,
                    len(session.messages),
                    session.last_archived_message_index,
                    session.created_at,
                    session.last_active_at,
                )
                if inserted is None:
                    raise SessionConflictError(
                        f"session {key!r} was created concurrently; load it and append instead"
                    )
                stored_count, next_seq = 0, 0
            else:
                if row is None or row["version"] != session.version:
                    stored = "deleted" if row is None else f"at version {row['version']}"
                    raise SessionConflictError(
                        f"session {key!r} changed since version {session.version}"
                        f" (now {stored}); reload it and apply the change again"
                    )
                stored_count, next_seq = int(row["message_count"]), int(row["max_seq"]) + 1
                if len(session.messages) < stored_count:
                    raise InvalidInputError(
                        f"session {key!r}: {len(session.messages)} messages but"
                        f" {stored_count} are stored; messages can only be appended"
                    )
                await conn.execute(
                    "UPDATE sessions SET session_type = $1, status = $2, guild_id = $3,"
                    " channel_id = $4, thread_id = $5, user_id = $6, version = version + 1,"
                    " message_count = $7, last_archived_message_index = $8,"
                    " last_active_at = $9 WHERE session_key = $10 AND version = $11",
                    session.session_type,
                    session.status,
                    session.guild_id,
                    session.channel_id,
                    session.thread_id,
                    session.user_id,
                    len(session.messages),
                    session.last_archived_message_index,
                    session.last_active_at,
                    key,
                    session.version,
                )
            new = session.messages[stored_count:]
            if new:
                await conn.executemany(
                    "INSERT INTO messages (session_key, seq, role, content, author_id,"
                    " author_name, discord_message_id, created_at, channel_id, turn_id)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    [
                        (
                            key,
                            next_seq + i,
                            m.role,
                            m.content,
                            m.author_id,
                            m.author_name,
                            m.discord_message_id,
                            m.timestamp,
                            m.channel_id,
                            m.turn_id,
                        )
                        for i, m in enumerate(new)
                    ],
                )

        await self._run(f"saving session {key!r}", body, write=True)
        session.version += 1

    async def load_session(self, session_key: str) -> ChatSession | None:
        async def body(conn: Conn) -> ChatSession | None:
            # One snapshot for the header and its messages.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(
                    f"SELECT {_SESSION_COLS} FROM sessions WHERE session_key = $1", session_key
                )
                if row is None:
                    return None
                messages = await conn.fetch(
                    "SELECT role, content, created_at, author_id, author_name,"
                    " discord_message_id, channel_id, turn_id, id FROM messages"
                    " WHERE session_key = $1 ORDER BY seq",
                    session_key,
                )
            return ChatSession(
                session_key=row["session_key"],
                session_type=row["session_type"],
                status=row["status"],
                guild_id=row["guild_id"],
                channel_id=row["channel_id"],
                thread_id=row["thread_id"],
                user_id=row["user_id"],
                version=row["version"],
                last_archived_message_index=row["last_archived_message_index"],
                created_at=row["created_at"],
                last_active_at=row["last_active_at"],
                messages=[
                    Message(
                        role=m["role"],
                        content=m["content"],
                        timestamp=m["created_at"],
                        author_id=m["author_id"],
                        author_name=m["author_name"],
                        discord_message_id=m["discord_message_id"],
                        channel_id=m["channel_id"],
                        turn_id=m["turn_id"],
                        stored_id=m["id"],
                    )
                    for m in messages
                ],
            )

        return await self._run(f"loading session {session_key!r}", body)

    async def delete_session(self, session_key: str) -> bool:
        async def body(conn: Conn) -> bool:
            status = await conn.execute("DELETE FROM sessions WHERE session_key = $1", session_key)
            return bool(status != "DELETE 0")

        return await self._run(f"deleting session {session_key!r}", body, write=True)

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
        params = Params()
        if guild_id is not None:
            where.append(f"guild_id = {params.add(guild_id)}")
        if status is not None:
            where.append(f"status = {params.add(status)}")
        if idle_before is not None:
            where.append(f"last_active_at < {params.add(idle_before.astimezone(UTC))}")
        sql = f"SELECT {_SESSION_COLS} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY last_active_at, session_key"
        if limit is not None:
            sql += f" LIMIT {params.add(limit)}"

        async def body(conn: Conn) -> list[SessionInfo]:
            return [SessionInfo(**dict(r)) for r in await conn.fetch(sql, *params)]

        return await self._run("listing sessions", body)

    # --- re-embedding ---------------------------------------------------------

    async def begin_reembed(self, target: EmbeddingConfig) -> None:
        check_embedding_config(None, target)
        self._check_indexable(target)

        async def body(conn: Conn) -> None:
            current = await self._read_config(conn)
            if current == target:
                raise InvalidInputError(
                    f"the database already uses {target.model!r} ({target.dimension} dims)"
                )
            running = await self._reembed_target(conn)
            if running is not None and running != target:
                await conn.execute("DELETE FROM reembed_vectors")
            await self._set_meta(
                conn,
                {
                    "reembed_model": target.model,
                    "reembed_dimension": str(target.dimension),
                },
            )

        await self._run("starting a re-embedding", body, write=True)

    async def reembed_todo(self, limit: int = 100) -> list[PendingChunk]:
        check_limit(limit, "reembed_todo")

        async def body(conn: Conn) -> list[PendingChunk]:
            rows = await conn.fetch(
                "SELECT c.id, c.source_id, c.content FROM knowledge_chunks c"
                " WHERE NOT EXISTS (SELECT 1 FROM reembed_vectors r WHERE r.chunk_id = c.id)"
                " ORDER BY c.id LIMIT $1",
                limit,
            )
            return [
                PendingChunk(chunk_id=r["id"], source_id=r["source_id"], content=r["content"])
                for r in rows
            ]

        return await self._run("listing chunks to re-embed", body)

    async def store_reembed(self, items: Sequence[tuple[int, Vector]]) -> int:
        check_ids("store_reembed", *(i for i, _ in items))

        async def body(conn: Conn) -> int:
            target = await self._reembed_target(conn)
            if target is None:
                raise InvalidInputError("no re-embedding is running (call begin_reembed first)")
            checked = {int(c): check_vector(v, target.dimension, f"chunk {c}") for c, v in items}
            if not checked:
                return 0
            rows = await conn.fetch(
                "INSERT INTO reembed_vectors (chunk_id, embedding)"
                " SELECT v.id, v.embedding FROM unnest($1::bigint[], $2::vector[])"
                "  AS v(id, embedding) JOIN knowledge_chunks c ON c.id = v.id"
                " ON CONFLICT (chunk_id) DO UPDATE SET embedding = EXCLUDED.embedding"
                " RETURNING chunk_id",
                list(checked),
                [_pgvec(v) for v in checked.values()],
            )
            return len(rows)

        return await self._run("storing re-embedded vectors", body, write=True)

    async def reembed_status(self) -> ReembedStatus | None:
        async def body(conn: Conn) -> ReembedStatus | None:
            target = await self._reembed_target(conn)
            if target is None:
                return None
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM reembed_vectors) AS done,"
                " (SELECT count(*) FROM knowledge_chunks) AS total"
            )
            return ReembedStatus(target=target, done=int(row["done"]), total=int(row["total"]))

        return await self._run("reading re-embedding progress", body)

    async def finish_reembed(self) -> EmbeddingConfig:
        async def body(conn: Conn) -> EmbeddingConfig:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            target = await self._reembed_target(conn)
            if target is None:
                raise InvalidInputError("no re-embedding is running")
            missing = int(
                await conn.fetchval(
                    "SELECT count(*) FROM knowledge_chunks c WHERE NOT EXISTS"
                    " (SELECT 1 FROM reembed_vectors r WHERE r.chunk_id = c.id)"
                )
            )
            if missing:
                raise InvalidInputError(
                    f"{missing} chunks have no vector for {target.model!r} yet;"
                    " run `kotonoha kb reembed` to finish"
                )
            # Searches keep using the old vectors until this transaction commits; the
            # index is rebuilt once after the swap rather than updated row by row.
            await conn.execute(f"DROP INDEX IF EXISTS {ANN_INDEX_NAME}")
            await conn.execute(
                "ALTER TABLE knowledge_chunks ALTER COLUMN embedding"
                f" TYPE vector({int(target.dimension)}) USING NULL",
                timeout=MAINTENANCE_TIMEOUT_SECONDS,
            )
            await conn.execute(
                "UPDATE knowledge_chunks c SET embedding = r.embedding, claimed_until = NULL"
                " FROM reembed_vectors r WHERE r.chunk_id = c.id",
                timeout=MAINTENANCE_TIMEOUT_SECONDS,
            )
            await conn.execute("DELETE FROM reembed_vectors")
            await conn.execute(
                "DELETE FROM kotonoha_meta WHERE key IN ('reembed_model', 'reembed_dimension')"
            )
            await self._set_meta(
                conn,
                {
                    "embedding_model": target.model,
                    "embedding_dimension": str(target.dimension),
                },
            )
            await conn.execute(
                "UPDATE knowledge_sources s SET status = " + SOURCE_STATUS_SQL.format(source="s.id")
            )
            await self._create_ann_index(conn, target.dimension)
            return target

        target = await self._run("switching to the re-embedded vectors", body, write=True)
        self._config = target
        await self._after_schema_change()
        return target

    async def abort_reembed(self) -> None:
        async def body(conn: Conn) -> None:
            await conn.execute("DELETE FROM reembed_vectors")
            await conn.execute(
                "DELETE FROM kotonoha_meta WHERE key IN ('reembed_model', 'reembed_dimension')"
            )

        await self._run("aborting the re-embedding", body, write=True)

    # --- job leases -----------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, seconds: float) -> bool:
        check_text(name, "lease name")
        check_text(owner, "lease owner")

        async def body(conn: Conn) -> bool:
            # The server's clock decides expiry, so processes on hosts whose clocks
            # disagree still agree. A competing INSERT waits for ours, then re-checks
            # the WHERE against our row: exactly one owner wins.
            row = await conn.fetchrow(
                "INSERT INTO job_leases AS l (name, owner, expires_at)"
                " VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))"
                " ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner,"
                " expires_at = EXCLUDED.expires_at"
                " WHERE l.expires_at < clock_timestamp() OR l.owner = EXCLUDED.owner"
                " RETURNING owner",
                name,
                owner,
                float(seconds),
            )
            return row is not None

        return await self._run(f"taking lease {name!r}", body, write=True)

    async def release_lease(self, name: str, owner: str) -> None:
        async def body(conn: Conn) -> None:
            await conn.execute("DELETE FROM job_leases WHERE name = $1 AND owner = $2", name, owner)

        await self._run(f"releasing lease {name!r}", body, write=True)

    # --- maintenance ----------------------------------------------------------

    async def stats(self) -> DatabaseStats:
        async def body(conn: Conn) -> DatabaseStats:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM sessions) AS sessions,"
                " (SELECT count(*) FROM messages) AS messages,"
                " (SELECT count(*) FROM knowledge_sources) AS sources,"
                " (SELECT count(*) FROM knowledge_chunks) AS chunks,"
                " (SELECT count(*) FROM knowledge_chunks WHERE embedding IS NULL) AS pending,"
                " (SELECT coalesce(max(version), 0) FROM schema_migrations) AS schema_version,"
                " pg_database_size(current_database()) AS size,"
                " current_setting('server_version') AS server_version,"
                " (SELECT extversion FROM pg_extension WHERE extname = 'vector') AS pgvector"
            )
            indexes = await conn.fetch(
                "SELECT i.relname AS name, am.amname AS type, pg_relation_size(i.oid) AS size,"
                " t.relname AS table_name FROM pg_index x"
                " JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
                " JOIN pg_am am ON am.oid = i.relam JOIN pg_namespace n ON n.oid = t.relnamespace"
                " WHERE n.nspname = current_schema() AND t.relname IN ('sessions', 'messages',"
                " 'knowledge_sources', 'knowledge_chunks', 'reembed_vectors')"
                " ORDER BY t.relname, i.relname"
            )
            config = await self._read_config(conn)
            ann = next((r for r in indexes if r["name"] == ANN_INDEX_NAME), None)
            details: dict[str, Any] = {
                "server_version": row["server_version"],
                "pgvector_version": row["pgvector"],
                "vector_index": (
                    f"{ann['type']} ({human_size(ann['size'])})" if ann else "none (exact search)"
                ),
                "vector_index_setting": self._index_type,
                "pool": f"{self._min_size}-{self._max_size} connections",
                "vector_searches": dict(self.search_counts),
                "indexes": [
                    {
                        "name": r["name"],
                        "table": r["table_name"],
                        "type": r["type"],
                        "size": int(r["size"]),
                    }
                    for r in indexes
                ],
            }
            if ann is not None:
                details["vector_index_definition"] = await conn.fetchval(
                    "SELECT pg_get_indexdef(to_regclass($1))", ANN_INDEX_NAME
                )
                details["vector_index_precision"] = IndexPlan.precision_of(
                    details["vector_index_definition"]
                )
            details["vector_index_precision_setting"] = self._index_precision
            if config is not None:
                details["exact_search_max_rows"] = exact_max_rows(
                    config.dimension, self._settings.exact_search_max_rows
                )
            if self._read_pool is not None and self._read_url:
                details["read_replica"] = self._read_url.display()
            return DatabaseStats(
                backend=self.backend_name,
                location=self.location,
                schema_version=int(row["schema_version"]),
                sessions=int(row["sessions"]),
                messages=int(row["messages"]),
                sources=int(row["sources"]),
                chunks=int(row["chunks"]),
                pending_chunks=int(row["pending"]),
                embedding=config,
                size_bytes=int(row["size"]),
                details=details,
            )

        return await self._run("reading statistics", body)
