"""PostgreSQLDatabase: asyncpg pool + pgvector (HNSW / IVFFlat, cosine), JSONB, GIN FTS.

Every operation borrows its own pooled connection (never shared by two coroutines) and
runs in one transaction when it writes. Vectors travel in pgvector's binary format: the
codec is registered on every pool connection in ``init``. Driver errors are translated
at this edge: connection problems become ``DatabaseUnavailableError``, the rest
``DatabaseError``; messages are redacted so a password in the URL never shows.

An operation that finds its connection dead (server restarted, backend terminated) is
retried once on a fresh connection, unless the connection died while committing
(then the outcome is unknown and the caller is told so).

Vector search (rules and their measurements in ``db/pg_search_plan.py``): small scopes
(at most ``exact_max_rows(dimension)`` rows after the guild, channel and metadata
filters) are searched exactly; larger ones through the approximate index (by default
HNSW over a halfvec copy of the normalised vector) with pgvector 0.8 iterative scans
and a re-sort by the exact float32 distance, falling back to an exact scan if the index
returns fewer rows than asked for. Searches follow the index that exists (its
definition is re-read with the scope sizes), so a database indexed by an older version
keeps working until ``rebuild_vector_index`` builds the configured one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import asyncpg.exceptions as pgerr
import numpy as np
from pgvector import Vector as PgVector
from pgvector.asyncpg import register_vector

from kotonoha_bot.db.base import (
    CAP_ANN_INDEX,
    CAP_MULTI_PROCESS,
    CAP_READ_REPLICA,
    CAP_SERVER,
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
from kotonoha_bot.db.pg_schema import (
    ANN_INDEX_NAME,
    CREATE_MIGRATIONS_TABLE,
    HALFVEC_INDEX_MAX_DIM,
    LATEST_SCHEMA_VERSION,
    MIGRATIONS,
    SCHEMA_LOCK_KEY,
    IndexType,
)
from kotonoha_bot.db.pg_search_plan import (
    IndexPlan,
    IndexPrecision,
    ef_search_for,
    exact_max_rows,
    filtered_exact_max_rows,
    use_exact,
)
from kotonoha_bot.db.postgres_dashboard import PostgresDashboard
from kotonoha_bot.db.postgres_memories import PostgresMemories
from kotonoha_bot.db.postgres_provenance import PostgresProvenance
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    DiskFullError,
    InvalidInputError,
    InvalidTextError,
    KotonohaError,
    NotFoundError,
    PoolTimeoutError,
    ReadOnlyDatabaseError,
    SchemaError,
    SessionConflictError,
    UnsupportedDimensionError,
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
    Vector,
)
from kotonoha_bot.redact import redact, register_secret
from kotonoha_bot.text import (
    BM25_B,
    BM25_K1,
    check_text,
    df_cap,
    human_size,
    keyword_document,
    keyword_plan,
    query_terms,
)

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = Any  # asyncpg.Connection (asyncpg ships no type hints)

#: How long pending_chunks keeps rows claimed for one embedding worker.
CLAIM_LEASE_SECONDS = 300
#: IVFFlat is trained on the rows present when it is built; fewer than this is no index.
IVFFLAT_MIN_ROWS = 1000
#: How long a scope's size is trusted when choosing exact vs approximate search.
SCOPE_SIZE_TTL_SECONDS = 30.0
SCOPE_SIZE_CACHE_MAX = 4096
#: Index builds and the re-embed swap may run far longer than DATABASE_COMMAND_TIMEOUT.
MAINTENANCE_TIMEOUT_SECONDS = 6 * 3600.0
#: A batch with at least this many vectors (and at least as many as stored) is loaded
#: without the ANN index, which is rebuilt afterwards (see _drop_index_for_bulk_load).
BULK_REBUILD_MIN_ROWS = 1000

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    pgerr.PostgresConnectionError,  # class 08, includes ConnectionDoesNotExistError
    pgerr.OperatorInterventionError,  # 57P01 admin shutdown, 57P02 crash, 57P03 starting
    pgerr.TooManyConnectionsError,
    pgerr.InvalidCatalogNameError,  # database does not exist
    pgerr.InvalidAuthorizationSpecificationError,  # includes InvalidPasswordError
    pgerr.ConnectionFailureError,
)
# A connection found dead mid-operation: retry once on a fresh one.
_RETRYABLE: tuple[type[BaseException], ...] = (
    pgerr.ConnectionDoesNotExistError,
    pgerr.AdminShutdownError,
    pgerr.CrashShutdownError,
    pgerr.InvalidCachedStatementError,
    # The protocol state broke under us (e.g. the server's FATAL message arrived
    # between two statements): the connection is unusable, a fresh one is fine.
    pgerr.InternalClientError,
    ConnectionResetError,
    BrokenPipeError,
)

_SCHEMA_VERSION_SQL = "SELECT coalesce(max(version), 0) FROM schema_migrations"
_SESSION_COLS = (
    "session_key, session_type, status, guild_id, channel_id, thread_id, user_id, version,"
    " message_count, last_archived_message_index, created_at, last_active_at"
)
_SOURCE_COLS = (
    "id, guild_id, channel_id, source_type, uri, title, content_hash, status, metadata,"
    " session_key, created_at, updated_at"
)
_CHUNK_COPY_COLS = [
    "source_id",
    "guild_id",
    "channel_id",
    "chunk_index",
    "chunk_key",
    "content",
    "search_text",
    "metadata",
    "embedding",
    "created_at",
]
_HIT_COLS = (
    "c.id, c.source_id, c.content, c.guild_id, c.channel_id, c.metadata, c.chunk_index,"
    " k.title, k.uri"
)


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _pgvec(vector: Vector) -> PgVector:
    """Wrap for the binary codec (a bare ndarray inside an array parameter looks nested)."""
    return PgVector(vector)


def _to_numpy(value: Any) -> Vector:
    arr: Vector = np.array(value.to_numpy(), dtype=np.float32)
    return arr


def _tsquery_lexeme(token: str) -> str:
    return "'" + token.replace("\\", "\\\\").replace("'", "''") + "'"


def _register_url_secrets(url: DatabaseURL) -> None:
    for secret in url.secrets:
        register_secret(secret)


async def _init_connection(conn: Conn) -> None:
    """Pool ``init``: the binary pgvector codecs (vector, halfvec, sparsevec)."""
    await register_vector(conn)


class PostgreSQLDatabase(PostgresDashboard, PostgresProvenance, PostgresMemories, AsyncLifecycle):
    """The server backend: asyncpg pool, pgvector ANN index, JSONB filters, GIN full text."""

    backend_name = "postgresql"
    capabilities: frozenset[str] = frozenset({CAP_ANN_INDEX, CAP_MULTI_PROCESS, CAP_SERVER})

    def __init__(self, url: str | DatabaseURL, *, settings: Settings) -> None:
        self._url = DatabaseURL.parse(url)
        self._dsn = self._url.dsn()
        _register_url_secrets(self._url)
        self._read_url = (
            DatabaseURL.parse(settings.database_read_url) if settings.database_read_url else None
        )
        if self._read_url:
            _register_url_secrets(self._read_url)
            self.capabilities = self.capabilities | {CAP_READ_REPLICA}
        self._settings = settings
        self._min_size = min(settings.database_pool_min_size, settings.database_pool_max_size)
        self._max_size = settings.database_pool_max_size
        self._acquire_timeout = settings.database_acquire_timeout
        self._command_timeout = settings.database_command_timeout
        self._index_type: IndexType = settings.vector_index_type
        self._index_precision: IndexPrecision = settings.vector_index_precision
        #: The existing index's precision (None: no index or not looked at yet) and the
        #: table's row estimate, refreshed with the scope sizes.
        self._live_precision: IndexPrecision | None = None
        self._table_rows = 0
        self._pool_ef = ef_search_for(0, settings.hnsw_ef_search)
        self._pool: Any = None
        self._read_pool: Any = None
        self._config: EmbeddingConfig | None = None
        self._pgvector_version: tuple[int, ...] = (0,)
        self._scope_sizes: dict[tuple[Any, ...], tuple[float, int, int]] = {}
        #: Vector searches by path since opening (shown by ``stats``).
        self.search_counts: Counter[str] = Counter()

    @property
    def location(self) -> str:
        return self._url.display()

    # --- lifecycle ------------------------------------------------------------------

    async def initialize(self) -> None:
        if self._pool is not None:
            return
        # The extension must exist before the pool's init can register its codec, so
        # migrations run on a bootstrap connection first.
        conn = await self._connect(self._dsn, "connecting")
        try:
            await self._guard("migrating the schema", self._migrate(conn))
            self._config = await self._guard("reading the configuration", self._read_config(conn))
            version = await conn.fetchval(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            )
            self._pgvector_version = tuple(int(p) for p in str(version).split(".")[:3])
            # The pooled connections' ef_search follows the table's size at start-up.
            rows = await conn.fetchval(
                "SELECT reltuples FROM pg_class WHERE oid = 'knowledge_chunks'::regclass"
            )
            self._table_rows = max(int(rows or 0), 0)
            self._pool_ef = ef_search_for(self._table_rows, self._settings.hnsw_ef_search)
        finally:
            await conn.close()
        self._pool = await self._create_pool(self._dsn)
        if self._read_url:
            try:
                self._read_pool = await self._create_pool(
                    self._read_url.dsn(), where=self._read_url.display()
                )
            except BaseException:
                await self.close()
                raise
        log.info("connected to %s", self.location)

    async def _connect(self, dsn: str, what: str) -> Conn:
        return await self._guard(
            what,
            asyncpg.connect(
                dsn,
                timeout=self._acquire_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": "kotonoha-bot"},
            ),
        )

    async def _create_pool(self, dsn: str, *, where: str | None = None) -> Any:
        return await self._guard(
            "opening the connection pool",
            asyncpg.create_pool(
                dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._acquire_timeout,
                command_timeout=self._command_timeout,
                init=_init_connection,
                # JIT compilation costs more than it saves on these short queries. The
                # vector-search settings are session defaults of every pooled connection
                # (they survive asyncpg's RESET ALL on release), so an ordinary search is
                # one statement: no transaction and SET LOCAL round trips around it.
                server_settings={
                    "application_name": "kotonoha-bot",
                    "jit": "off",
                    **self._search_settings(),
                },
            ),
            where=where,
        )

    async def _migrate(self, conn: Conn) -> None:
        async with conn.transaction():
            # Two processes starting at once: the second waits here, then sees the work done.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            if not await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'vector'"):
                try:
                    async with conn.transaction():
                        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except pgerr.InsufficientPrivilegeError:
                    raise SchemaError(
                        "the pgvector extension is not installed in this database and this"
                        " user may not create it; run `CREATE EXTENSION vector` as a superuser"
                    ) from None
                except pgerr.UndefinedFileError:
                    raise SchemaError(
                        "the PostgreSQL server has no pgvector extension; use an image with"
                        " pgvector (e.g. pgvector/pgvector:pg18)"
                    ) from None
            await conn.execute(CREATE_MIGRATIONS_TABLE)
            current = int(await conn.fetchval(_SCHEMA_VERSION_SQL))
            if current > LATEST_SCHEMA_VERSION:
                raise SchemaError(
                    f"{self.location} has schema version {current}, newer than this"
                    f" kotonoha-bot understands ({LATEST_SCHEMA_VERSION}); upgrade kotonoha-bot"
                )
            for version, name, sql in MIGRATIONS:
                if version <= current:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                log.info("applied schema migration %d (%s)", version, name)

    async def close(self) -> None:
        pools = [p for p in (self._read_pool, self._pool) if p is not None]
        self._pool = self._read_pool = None
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except (TimeoutError, *_CONNECTION_ERRORS, pgerr.InterfaceError):
                pool.terminate()

    # --- plumbing -------------------------------------------------------------------

    async def _guard(self, what: str, awaitable: Awaitable[T], *, where: str | None = None) -> T:
        """Await ``awaitable`` while connecting, translating driver errors.

        ``where`` names the server when it is not the primary (the read replica).
        """
        try:
            return await awaitable
        except KotonohaError:
            raise
        except BaseException as exc:
            translated = self._translate(what, exc, connecting=True, where=where)
            if translated is None:
                raise
            raise translated from None

    def _translate(
        self, what: str, exc: BaseException, *, connecting: bool = False, where: str | None = None
    ) -> KotonohaError | None:
        """The typed error for a driver exception (None: not ours to translate)."""
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            return None
        detail = redact(str(exc).strip() or type(exc).__name__)
        if isinstance(exc, TimeoutError) and not connecting:
            # (TimeoutError is an OSError: test it before the connection errors.)
            return DatabaseError(
                f"{what}: cancelled after DATABASE_COMMAND_TIMEOUT={self._command_timeout:g}s"
            )
        if isinstance(exc, _CONNECTION_ERRORS) or (
            isinstance(exc, pgerr.InterfaceError) and "closed" in str(exc)
        ):
            return DatabaseUnavailableError(
                f"{what}: cannot reach PostgreSQL at {where or self.location}: {detail}"
            )
        if isinstance(exc, pgerr.DiskFullError):
            return DiskFullError(
                f"{what}: the PostgreSQL server's disk is full; the transaction was rolled back"
                f" — free space on the server and retry ({detail})"
            )
        if isinstance(exc, pgerr.ReadOnlySQLTransactionError):
            return ReadOnlyDatabaseError(
                f"{what}: {where or self.location} only accepts reads (a replica or a"
                f" read-only server); nothing was changed ({detail})"
            )
        if isinstance(exc, pgerr.QueryCanceledError):
            return DatabaseError(f"{what}: the server cancelled the statement ({detail})")
        if isinstance(
            exc, pgerr.UntranslatableCharacterError | pgerr.CharacterNotInRepertoireError
        ):
            return InvalidTextError(f"{what}: text PostgreSQL cannot store ({detail})")
        if isinstance(exc, UnicodeEncodeError):
            return InvalidTextError(f"{what}: text is not valid Unicode ({exc.reason})")
        if isinstance(exc, pgerr.PostgresError | pgerr.InterfaceError | pgerr.InternalClientError):
            return DatabaseError(f"{what}: {detail}")
        return None

    def _require_pool(self, read: bool = False) -> Any:
        if self._pool is None:
            raise DatabaseError("the database is not open (use `async with open_database(...)`)")
        return self._read_pool if read and self._read_pool is not None else self._pool

    async def _run(
        self,
        what: str,
        body: Callable[[Conn], Awaitable[T]],
        *,
        write: bool = False,
        read_replica: bool = False,
    ) -> T:
        """Run ``body`` on a pooled connection (in a transaction when ``write``).

        A dead connection is retried once; driver errors become typed errors.
        """
        pool = self._require_pool(read_replica)
        for attempt in (1, 2):
            committing = False
            try:
                try:
                    conn = await pool.acquire(timeout=self._acquire_timeout)
                except TimeoutError:
                    raise PoolTimeoutError(
                        f"{what}: no pooled connection became free within"
                        f" {self._acquire_timeout:g}s (DATABASE_ACQUIRE_TIMEOUT); all"
                        f" {self._max_size} connections (DATABASE_POOL_MAX_SIZE) are busy"
                    ) from None
                try:
                    if not write:
                        return await body(conn)
                    tx = conn.transaction()
                    await tx.start()
                    try:
                        result = await body(conn)
                    except BaseException:
                        # If this fails too, releasing the connection resets or drops it.
                        with contextlib.suppress(Exception):
                            if not conn.is_closed():
                                await tx.rollback()
                        raise
                    committing = True
                    await tx.commit()
                    return result
                except _RETRYABLE:
                    # Never hand a broken connection back: the pool reconnects the slot.
                    # (asyncpg may already have detached a connection that closed.)
                    with contextlib.suppress(pgerr.InterfaceError):
                        conn.terminate()
                    raise
                finally:
                    await pool.release(conn)
            except KotonohaError:
                raise
            except _RETRYABLE as exc:
                if committing:
                    raise DatabaseUnavailableError(
                        f"{what}: the connection to {self.location} was lost while committing;"
                        " the change may or may not have been saved"
                    ) from None
                if attempt == 1:
                    log.warning("%s: connection lost (%s); retrying once", what, type(exc).__name__)
                    # The server most likely dropped every connection (restart, failover):
                    # replace the idle ones too instead of finding them dead one by one.
                    await pool.expire_connections()
                    continue
                translated = self._translate(what, exc)
                assert translated is not None
                raise translated from None
            except BaseException as exc:
                translated = self._translate(what, exc)
                if translated is None:
                    raise
                raise translated from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_config(self, conn: Conn) -> EmbeddingConfig | None:
        rows = await conn.fetch(
            "SELECT key, value FROM kotonoha_meta"
            " WHERE key IN ('embedding_model', 'embedding_dimension')"
        )
        return config_from_meta({r["key"]: r["value"] for r in rows}, "embedding")

    async def _reembed_target(self, conn: Conn) -> EmbeddingConfig | None:
        rows = await conn.fetch(
            "SELECT key, value FROM kotonoha_meta"
            " WHERE key IN ('reembed_model', 'reembed_dimension')"
        )
        return config_from_meta({r["key"]: r["value"] for r in rows}, "reembed")

    async def _set_meta(self, conn: Conn, items: Mapping[str, str]) -> None:
        await conn.executemany(
            "INSERT INTO kotonoha_meta (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            list(items.items()),
        )

    async def schema_version(self) -> int:
        async def body(conn: Conn) -> int:
            return int(await conn.fetchval(_SCHEMA_VERSION_SQL))

        return await self._run("reading the schema version", body)

    # --- sessions -------------------------------------------------------------------

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
        where: list[str] = []
        params: list[Any] = []
        if guild_id is not None:
            params.append(guild_id)
            where.append(f"guild_id = ${len(params)}")
        if status is not None:
            params.append(status)
            where.append(f"status = ${len(params)}")
        if idle_before is not None:
            params.append(idle_before.astimezone(UTC))
            where.append(f"last_active_at < ${len(params)}")
        sql = f"SELECT {_SESSION_COLS} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY last_active_at, session_key"
        if limit is not None:
            params.append(max(int(limit), 0))
            sql += f" LIMIT ${len(params)}"

        async def body(conn: Conn) -> list[SessionInfo]:
            return [SessionInfo(**dict(r)) for r in await conn.fetch(sql, *params)]

        return await self._run("listing sessions", body)

    # --- embedding configuration ----------------------------------------------------

    async def get_embedding_config(self) -> EmbeddingConfig | None:
        self._config = await self._run("reading the embedding configuration", self._read_config)
        return self._config

    async def set_embedding_config(self, config: EmbeddingConfig) -> None:
        check_embedding_config(None, config)

        async def body(conn: Conn) -> None:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            recorded = await self._read_config(conn)
            if not check_embedding_config(recorded, config):
                return
            self._check_indexable(config)
            await self._set_meta(
                conn,
                {
                    "embedding_model": config.model,
                    "embedding_dimension": str(config.dimension),
                },
            )
            await conn.execute(f"DROP INDEX IF EXISTS {ANN_INDEX_NAME}")
            await conn.execute(
                "ALTER TABLE knowledge_chunks ALTER COLUMN embedding"
                f" TYPE vector({int(config.dimension)})"
            )
            await self._create_ann_index(conn, config.dimension)

        await self._run("recording the embedding configuration", body, write=True)
        self._config = config
        await self._after_schema_change()

    @staticmethod
    def _check_indexable(config: EmbeddingConfig) -> None:
        if config.dimension > HALFVEC_INDEX_MAX_DIM:
            raise UnsupportedDimensionError(
                f"embedding model {config.model!r} has {config.dimension} dimensions; pgvector"
                f" indexes at most {HALFVEC_INDEX_MAX_DIM} (as halfvec). Use a smaller model or"
                " request shortened embeddings (e.g. OpenAI `dimensions`), or use SQLite"
            )

    async def _create_ann_index(
        self,
        conn: Conn,
        dimension: int,
        *,
        concurrently: bool = False,
        name: str = ANN_INDEX_NAME,
    ) -> bool:
        """Create the configured approximate index; False when IVFFlat has too few rows."""
        lists = 0
        if self._index_type == "ivfflat":
            rows = int(
                await conn.fetchval(
                    "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL"
                )
            )
            if rows < IVFFLAT_MIN_ROWS:
                return False
            lists = self._settings.ivfflat_lists or max(10, rows // 1000)
        s = self._settings
        plan = IndexPlan.for_dimension(
            dimension,
            self._index_type,
            self._index_precision,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            lists=lists or 100,
        )
        await conn.execute(
            plan.ddl(name, concurrently=concurrently), timeout=MAINTENANCE_TIMEOUT_SECONDS
        )
        self._live_precision = None  # re-read with the next scope count
        return True

    async def _after_schema_change(self) -> None:
        """Column types changed: drop cached statements everywhere in our pools."""
        self._scope_sizes.clear()
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                await pool.expire_connections()

    async def _current_config(self, conn: Conn) -> EmbeddingConfig | None:
        """The recorded config; cached once known (it changes only through this class)."""
        if self._config is None:
            self._config = await self._read_config(conn)
        return self._config

    @staticmethod
    def _require_config(
        chunks: Sequence[KnowledgeChunk], config: EmbeddingConfig | None, where: str
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

        async def body(conn: Conn) -> KnowledgeSource:
            config = await self._read_config(conn)
            # The source now; its chunks while they stream to the server (one bad chunk
            # aborts the COPY and the transaction: nothing is kept).
            check_source(source, [], None)
            self._require_config(chunks, config, where)
            _check_chunk_scope(source.guild_id, chunks, where)
            status = "ready" if all(c.embedding is not None for c in chunks) else "pending"
            row = await conn.fetchrow(
                "INSERT INTO knowledge_sources AS s (guild_id, channel_id, source_type, uri,"
                " title, content_hash, status, metadata, session_key, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, now(), now())"
                " ON CONFLICT (guild_id, uri) DO UPDATE SET channel_id = EXCLUDED.channel_id,"
                " source_type = EXCLUDED.source_type, title = EXCLUDED.title,"
                " content_hash = EXCLUDED.content_hash, status = EXCLUDED.status,"
                " metadata = EXCLUDED.metadata, session_key = EXCLUDED.session_key,"
                " updated_at = EXCLUDED.updated_at"
                f" RETURNING {_SOURCE_COLS}",
                source.guild_id,
                source.channel_id,
                source.source_type,
                source.uri,
                source.title,
                source.content_hash,
                status,
                _json(source.metadata),
                source.session_key,
            )
            source_id = int(row["id"])
            await conn.execute("DELETE FROM knowledge_chunks WHERE source_id = $1", source_id)
            await self._copy_chunks(
                conn, source_id, source.guild_id, source.channel_id, chunks, config, where
            )
            return _source(row)

        saved = await self._run(f"saving {where}", body, write=True)
        self._scope_sizes.clear()
        await self._maybe_build_ivfflat()
        return saved

    async def ensure_source(self, source: KnowledgeSource) -> KnowledgeSource:
        check_source(source, [], None)

        async def body(conn: Conn) -> KnowledgeSource:
            # A concurrent creator makes our INSERT wait, then do nothing; the SELECT
            # (a new snapshot under READ COMMITTED) sees its row.
            row = await conn.fetchrow(
                "INSERT INTO knowledge_sources (guild_id, channel_id, source_type, uri, title,"
                " content_hash, status, metadata, session_key, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, 'ready', $7::jsonb, $8, now(), now())"
                f" ON CONFLICT (guild_id, uri) DO NOTHING RETURNING {_SOURCE_COLS}",
                source.guild_id,
                source.channel_id,
                source.source_type,
                source.uri,
                source.title,
                source.content_hash,
                _json(source.metadata),
                source.session_key,
            )
            if row is None:
                row = await conn.fetchrow(
                    f"SELECT {_SOURCE_COLS} FROM knowledge_sources"
                    " WHERE guild_id = $1 AND uri = $2",
                    source.guild_id,
                    source.uri,
                )
            return _source(row)

        return await self._run(f"creating source {source.uri!r}", body, write=True)

    async def _copy_chunks(
        self,
        conn: Conn,
        source_id: int,
        guild_id: int,
        channel_id: int | None,
        chunks: Sequence[KnowledgeChunk],
        config: EmbeddingConfig | None,
        validate: str | None = None,
    ) -> int:
        """Bulk insert (binary COPY) chunks known to be new.

        With ``validate`` (the "where" of error messages) each chunk is checked with
        the shared rules as it is sent; otherwise the caller has checked them.
        """
        missing = await self._missing_messages(conn, chunks)
        if missing:
            # A message of its window was deleted meanwhile: never store that chunk.
            chunks = [c for c in chunks if missing.isdisjoint(c.message_ids)]
        if not chunks:
            return 0
        now = datetime.now(UTC)
        dim = config.dimension if config else None

        # A generator, not a list: asyncpg sends each buffer as soon as it fills, so the
        # server ingests rows while Python is still checking and tokenising the next.
        def records() -> Iterator[tuple[Any, ...]]:
            seen: set[str] = set()
            for c in chunks:
                if validate is not None:
                    check_chunks([c], dim, validate)
                    if c.chunk_key in seen:
                        raise InvalidInputError(
                            f"{validate} chunk {c.chunk_index} ({c.chunk_key!r}):"
                            " duplicate chunk_key"
                        )
                    seen.add(c.chunk_key)
                yield (
                    source_id,
                    guild_id,
                    c.channel_id if c.channel_id is not None else channel_id,
                    c.chunk_index,
                    c.chunk_key,
                    c.content,
                    keyword_document(c.content),
                    _json(c.metadata),
                    None if c.embedding is None else np.asarray(c.embedding, dtype=np.float32),
                    now,
                )

        embedded = sum(1 for c in chunks if c.embedding is not None)
        rebuild = await self._drop_index_for_bulk_load(conn, embedded, config)
        await conn.copy_records_to_table(
            "knowledge_chunks",
            records=records(),
            columns=_CHUNK_COPY_COLS,
            timeout=MAINTENANCE_TIMEOUT_SECONDS,
        )
        await self._link_chunks(conn, source_id, chunks)
        if rebuild is not None:
            await self._create_ann_index(conn, rebuild)
        return len(chunks)

    async def _drop_index_for_bulk_load(
        self, conn: Conn, embedded: int, config: EmbeddingConfig | None
    ) -> int | None:
        """Drop the ANN index before a bulk load that at least doubles the vectors.

        Inserting into HNSW costs milliseconds per 1536-d row, several times more than
        building the index over the same rows, so a batch at least as large as what is
        stored is loaded without the index and the index is rebuilt in the same
        transaction (searches wait for it). Returns the dimension to rebuild with.
        """
        if embedded < BULK_REBUILD_MIN_ROWS or config is None:
            return None
        stored = int(
            await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks"
                " WHERE embedding IS NOT NULL LIMIT $1) AS s",
                embedded + 1,
            )
        )
        if stored > embedded:
            return None
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", ANN_INDEX_NAME):
            return None
        await conn.execute(f"DROP INDEX {ANN_INDEX_NAME}")
        return config.dimension

    async def add_chunks(self, source_id: int, chunks: Sequence[KnowledgeChunk]) -> int:
        check_ids("add_chunks", source_id)

        async def body(conn: Conn) -> int:
            # Locking the source row serialises concurrent add_chunks on one source.
            row = await conn.fetchrow(
                "SELECT guild_id, channel_id, uri FROM knowledge_sources WHERE id = $1 FOR UPDATE",
                source_id,
            )
            if row is None:
                raise NotFoundError(f"knowledge source {source_id} does not exist")
            where = f"source {row['uri']!r}"
            config = await self._read_config(conn)
            check_chunks(chunks, config.dimension if config else None, where)
            self._require_config(chunks, config, where)
            _check_chunk_scope(row["guild_id"], chunks, where)
            existing = {
                r["chunk_key"]
                for r in await conn.fetch(
                    "SELECT chunk_key FROM knowledge_chunks"
                    " WHERE source_id = $1 AND chunk_key = ANY($2::text[])",
                    source_id,
                    [c.chunk_key for c in chunks],
                )
            }
            new = [c for c in chunks if c.chunk_key not in existing]
            added = await self._copy_chunks(
                conn, source_id, row["guild_id"], row["channel_id"], new, config
            )
            if added:
                await self._refresh_status(conn, [source_id])
            return added

        added = await self._run(f"adding chunks to source {source_id}", body, write=True)
        if added:
            self._scope_sizes.clear()
            await self._maybe_build_ivfflat()
        return added

    async def set_source_hash(self, source_id: int, content_hash: str) -> bool:
        check_ids("set_source_hash", source_id)
        check_text(content_hash, "content_hash")

        async def body(conn: Conn) -> bool:
            status = await conn.execute(
                "UPDATE knowledge_sources SET content_hash = $1, updated_at = now() WHERE id = $2",
                content_hash,
                source_id,
            )
            return bool(status != "UPDATE 0")

        return await self._run(f"recording the hash of source {source_id}", body, write=True)

    @staticmethod
    async def _refresh_status(conn: Conn, source_ids: Sequence[int]) -> None:
        if not source_ids:
            return
        await conn.execute(
            "UPDATE knowledge_sources s SET updated_at = now(), status = CASE WHEN EXISTS"
            " (SELECT 1 FROM knowledge_chunks c WHERE c.source_id = s.id"
            "  AND c.embedding IS NULL) THEN 'pending' ELSE 'ready' END"
            " WHERE s.id = ANY($1::bigint[])",
            list(source_ids),
        )

    async def get_source(self, source_id: int) -> KnowledgeSource | None:
        check_ids("get_source", source_id)

        async def body(conn: Conn) -> KnowledgeSource | None:
            row = await conn.fetchrow(
                f"SELECT {_SOURCE_COLS} FROM knowledge_sources WHERE id = $1", source_id
            )
            return None if row is None else _source(row)

        return await self._run(f"reading source {source_id}", body)

    async def find_source(self, guild_id: int, uri: str) -> KnowledgeSource | None:
        check_ids("find_source", guild_id)

        async def body(conn: Conn) -> KnowledgeSource | None:
            row = await conn.fetchrow(
                f"SELECT {_SOURCE_COLS} FROM knowledge_sources WHERE guild_id = $1 AND uri = $2",
                guild_id,
                uri,
            )
            return None if row is None else _source(row)

        return await self._run(f"finding source {uri!r}", body)

    async def list_sources(
        self, *, guild_id: int | None = None, status: str | None = None
    ) -> list[KnowledgeSource]:
        check_ids("list_sources", guild_id)
        where: list[str] = []
        params: list[Any] = []
        if guild_id is not None:
            params.append(guild_id)
            where.append(f"guild_id = ${len(params)}")
        if status is not None:
            params.append(status)
            where.append(f"status = ${len(params)}")
        sql = f"SELECT {_SOURCE_COLS} FROM knowledge_sources"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"

        async def body(conn: Conn) -> list[KnowledgeSource]:
            return [_source(r) for r in await conn.fetch(sql, *params)]

        return await self._run("listing sources", body)

    async def delete_source(self, source_id: int) -> bool:
        check_ids("delete_source", source_id)

        async def body(conn: Conn) -> bool:
            status = await conn.execute("DELETE FROM knowledge_sources WHERE id = $1", source_id)
            return bool(status != "DELETE 0")

        existed = await self._run(f"deleting source {source_id}", body, write=True)
        self._scope_sizes.clear()
        return existed

    async def list_chunks(self, source_id: int) -> list[KnowledgeChunk]:
        check_ids("list_chunks", source_id)

        async def body(conn: Conn) -> list[KnowledgeChunk]:
            rows = await conn.fetch(
                "SELECT id, source_id, guild_id, channel_id, chunk_index, chunk_key, content,"
                " metadata, embedding FROM knowledge_chunks WHERE source_id = $1"
                " ORDER BY chunk_index, id",
                source_id,
            )
            links = await self._chunk_message_ids(conn, [int(r["id"]) for r in rows])
            return [
                KnowledgeChunk(
                    chunk_id=r["id"],
                    source_id=r["source_id"],
                    guild_id=r["guild_id"],
                    channel_id=r["channel_id"],
                    chunk_index=r["chunk_index"],
                    chunk_key=r["chunk_key"],
                    content=r["content"],
                    metadata=json.loads(r["metadata"]),
                    embedding=None if r["embedding"] is None else _to_numpy(r["embedding"]),
                    message_ids=links.get(int(r["id"]), ()),
                )
                for r in rows
            ]

        return await self._run(f"listing chunks of source {source_id}", body)

    async def pending_chunks(self, limit: int = 100) -> list[PendingChunk]:
        if limit < 1:
            return []

        async def body(conn: Conn) -> list[PendingChunk]:
            # Claim with a lease: a second worker skips these rows (SKIP LOCKED while we
            # update, claimed_until afterwards); a crashed worker's rows come back later.
            rows = await conn.fetch(
                "UPDATE knowledge_chunks c"
                f" SET claimed_until = now() + interval '{CLAIM_LEASE_SECONDS} seconds'"
                " FROM (SELECT id FROM knowledge_chunks WHERE embedding IS NULL"
                "       AND (claimed_until IS NULL OR claimed_until < now())"
                "       ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) AS p"
                " WHERE c.id = p.id RETURNING c.id, c.source_id, c.content",
                limit,
            )
            return sorted(
                (
                    PendingChunk(chunk_id=r["id"], source_id=r["source_id"], content=r["content"])
                    for r in rows
                ),
                key=lambda p: p.chunk_id,
            )

        return await self._run("claiming chunks awaiting embeddings", body, write=True)

    async def set_chunk_embeddings(self, items: Sequence[tuple[int, Vector]]) -> int:
        check_ids("set_chunk_embeddings", *(i for i, _ in items))

        async def body(conn: Conn) -> int:
            config = await self._read_config(conn)
            if config is None and items:
                raise InvalidInputError(
                    "no embedding model recorded in this database yet;"
                    " call set_embedding_config before writing vectors"
                )
            dim = config.dimension if config else None
            checked = {int(cid): check_vector(v, dim, f"chunk {cid}") for cid, v in items}
            if not checked:
                return 0
            # Lock the sources first (in id order): two workers finishing disjoint chunks
            # of one source would otherwise each judge it from a snapshot without the
            # other's vectors and leave it 'pending' for ever. After the lock, this
            # transaction's next statements see what the other committed.
            await conn.execute(
                "SELECT s.id FROM knowledge_sources s WHERE s.id IN"
                " (SELECT c.source_id FROM knowledge_chunks c WHERE c.id = ANY($1::bigint[]))"
                " ORDER BY s.id FOR UPDATE OF s",
                list(checked),
            )
            rows = await conn.fetch(
                "UPDATE knowledge_chunks c SET embedding = v.embedding, claimed_until = NULL"
                " FROM unnest($1::bigint[], $2::vector[]) AS v(id, embedding)"
                " WHERE c.id = v.id RETURNING c.source_id",
                list(checked),
                [_pgvec(v) for v in checked.values()],
            )
            await self._refresh_status(conn, sorted({int(r["source_id"]) for r in rows}))
            return len(rows)

        updated = await self._run("storing embeddings", body, write=True)
        if updated:
            self._scope_sizes.clear()
            await self._maybe_build_ivfflat()
        return updated

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
        for attempt in (1, 2):
            if self._config is None:
                self._config = await self._run(
                    "reading the embedding configuration", self._read_config
                )
            config = self._config
            query = check_vector(query_embedding, config.dimension if config else None, "query")
            if config is None:
                return []
            try:
                rows = await self._search_rows(config, query, guild_id, channel_id, top_k, wanted)
                break
            except DatabaseError as exc:
                # Another process switched models (finish_reembed): reload and check again.
                if attempt == 2 or "different vector dimensions" not in str(exc):
                    raise
                self._config = None
        hits = [_hit(r, 1.0 - float(r["dist"]), similarity=True) for r in rows]
        if min_similarity is not None:
            hits = [h for h in hits if h.score >= min_similarity]
        return hits

    async def _search_rows(
        self,
        config: EmbeddingConfig,
        query: Vector,
        guild_id: int,
        channel_id: int | None,
        top_k: int,
        wanted: Mapping[str, list[Any]],
    ) -> list[Any]:
        scope, params = vector_scope(query, guild_id, channel_id, wanted)
        scope_params = params[1:]
        size_key = (guild_id, channel_id, _json(wanted))
        setting = self._settings.exact_search_max_rows
        dim = config.dimension
        # Counted up to the larger (filtered) threshold; which one applies is decided below.
        bound = max(filtered_exact_max_rows(dim, setting), exact_max_rows(dim, setting), top_k)

        async def body(conn: Conn) -> list[Any]:
            size = self._cached_scope_size(size_key, bound)
            if size is None:
                n = len(scope_params)
                # The index's definition and the table's size ride along: searches follow
                # the index that exists, and ef_search follows the graph's size.
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks c WHERE"
                    f" {_renumber(scope, 1)} LIMIT ${n + 1}) AS s) AS size,"
                    " (SELECT reltuples FROM pg_class"
                    "  WHERE oid = 'knowledge_chunks'::regclass) AS table_rows,"
                    f" pg_get_indexdef(to_regclass(${n + 2})) AS indexdef",
                    *scope_params,
                    bound + 1,
                    ANN_INDEX_NAME,
                )
                size = int(row["size"])
                self._table_rows = max(int(row["table_rows"] or 0), size)
                self._live_precision = IndexPlan.precision_of(row["indexdef"])
                self._remember_scope_size(size_key, bound, size)
            if size == 0:
                return []
            if size > top_k and not use_exact(size, self._table_rows, dim, setting):
                guc, sql, limit = self.ann_statements(config.dimension, scope, len(params), top_k)
                if self._needs_local_settings(limit):
                    async with conn.transaction(readonly=True):
                        await conn.execute(guc)
                        rows = list(await conn.fetch(sql, *params, limit, top_k))
                else:
                    rows = list(await conn.fetch(sql, *params, limit, top_k))
                if len(rows) >= top_k:
                    self.search_counts["approximate"] += 1
                    return rows
                self.search_counts["exact_fallback"] += 1
            else:
                self.search_counts["exact"] += 1
            return list(await conn.fetch(exact_search_sql(scope, len(params) + 1), *params, top_k))

        return await self._run("searching knowledge", body, read_replica=True)

    def _default_ef_search(self) -> int:
        """The pooled connections' ef_search: the setting, else by the size at start-up."""
        return self._pool_ef

    def _ef_search(self, limit: int) -> int:
        """This search's ef_search: by the graph's size, never below the candidates wanted."""
        return max(ef_search_for(self._table_rows, self._settings.hnsw_ef_search), limit)

    def _search_settings(self) -> dict[str, str]:
        """Connection defaults for approximate search (both index types, pgvector 0.8+)."""
        settings = self._settings
        return {
            "hnsw.ef_search": str(self._default_ef_search()),
            "hnsw.iterative_scan": "relaxed_order",
            "ivfflat.probes": str(settings.ivfflat_probes),
            "ivfflat.iterative_scan": "relaxed_order",
        }

    def _needs_local_settings(self, limit: int) -> bool:
        """True when the connection defaults do not fit this search (SET LOCAL needed)."""
        if self._pgvector_version < (0, 8):
            return True  # no iterative scan: the connection defaults mean nothing
        return self._index_type == "hnsw" and self._ef_search(limit) != self._default_ef_search()

    def _live_plan(self, dimension: int) -> IndexPlan:
        """The plan of the index searches should use: the existing one, else the configured."""
        return IndexPlan.for_dimension(
            dimension, self._index_type, self._live_precision or self._index_precision
        )

    def ann_statements(
        self, dimension: int, scope: str, n_params: int, top_k: int
    ) -> tuple[str, str, int]:
        """The approximate search: (SET LOCAL settings, SELECT, inner limit).

        The SELECT takes the scope's parameters, then the inner limit and ``top_k``.
        It runs an iterative index scan (pgvector 0.8, relaxed order) and re-sorts the
        candidates by exact float32 distance; a halfvec index yields
        ``HALFVEC_OVERFETCH`` times more candidates for that re-sort.
        """
        plan = self._live_plan(dimension)
        limit = plan.candidates(top_k)
        settings = self._settings
        if self._index_type == "hnsw":
            guc = [f"SET LOCAL hnsw.ef_search = {self._ef_search(limit)}"]
            if self._pgvector_version >= (0, 8):
                guc.append("SET LOCAL hnsw.iterative_scan = relaxed_order")
        else:
            guc = [f"SET LOCAL ivfflat.probes = {int(settings.ivfflat_probes)}"]
            if self._pgvector_version >= (0, 8):
                guc.append("SET LOCAL ivfflat.iterative_scan = relaxed_order")
        order = f"{plan.key_sql('c.embedding')} <=> {plan.query_sql('$1')}"
        sql = (
            f"SELECT r.dist, {_HIT_COLS} FROM ("
            "  SELECT c.id, c.embedding <=> $1::vector AS dist FROM knowledge_chunks c"
            f"  WHERE {scope}"
            f"  ORDER BY {order}"
            f"  LIMIT ${n_params + 1}"
            ") AS r JOIN knowledge_chunks c ON c.id = r.id"
            " JOIN knowledge_sources k ON k.id = c.source_id"
            f" ORDER BY r.dist, r.id LIMIT ${n_params + 2}"
        )
        return "; ".join(guc), sql, limit

    def _cached_scope_size(self, key: tuple[Any, ...], bound: int) -> int | None:
        """The scope's row count, capped at ``bound + 1``, if counted recently."""
        entry = self._scope_sizes.get(key)
        if entry is None or time.monotonic() - entry[0] > SCOPE_SIZE_TTL_SECONDS:
            return None
        _, size, counted_bound = entry
        if size > counted_bound and bound > counted_bound:
            return None  # "more than the old cap" says nothing about a higher cap
        return min(size, bound + 1)

    def _remember_scope_size(self, key: tuple[Any, ...], bound: int, size: int) -> None:
        if len(self._scope_sizes) >= SCOPE_SIZE_CACHE_MAX:
            self._scope_sizes.clear()
        self._scope_sizes[key] = (time.monotonic(), size, bound)

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
        terms = [t for t in query_terms(query) if len(t.encode("utf-8")) < 2048]
        if not terms:
            return []
        params: list[Any] = [guild_id]
        scope = "c.guild_id = $1"
        if channel_id is not None:
            params.append(channel_id)
            scope += f" AND c.channel_id = ${len(params)}"
        scope += _filter_sql(wanted, params)
        n = len(params)
        # The scope's statistics (the same numbers SQLite computes): its chunk count and
        # each term's document frequency (GIN index), then the shared plan in Python.
        # One count per term, each with its own tsquery parameter and stopping at the
        # shared cap (text.df_cap). Each must be a GIN index scan: left to itself the
        # planner seq-scans for a common term, computing every row's tsvector (0.4 s
        # per term at 20k chunks), hence enable_seqscan off for these statements.
        count_sql = f"SELECT count(*) FROM knowledge_chunks c WHERE {scope}"
        counts = ", ".join(
            f"(SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks c WHERE {scope}"
            f" AND kotonoha_tsvector(c.search_text) @@ ${n + 2 + i}::tsquery"
            f" LIMIT ${n + 1}) AS m)"
            for i in range(len(terms))
        )
        stats_sql = f"SELECT ARRAY[{counts}]::bigint[] AS df"
        # BM25 with the plan's IDF weights (k1, b from kotonoha_bot.text), and coverage:
        # the weighted share of the plan's terms a chunk holds.
        score_sql = (
            "WITH hits AS MATERIALIZED ("
            "  SELECT c.id, string_to_array(c.search_text, ' ') AS toks FROM knowledge_chunks c"
            f"  WHERE {scope} AND kotonoha_tsvector(c.search_text) @@ ${n + 1}::tsquery),"
            " avgdl AS (SELECT greatest(avg(greatest(cardinality(toks), 1)), 1)::float8 AS v"
            "           FROM hits),"
            " tf AS (SELECT h.id, q.w,"
            "        cardinality(array_positions(h.toks, q.tok))::float8 AS tf,"
            "        greatest(cardinality(h.toks), 1)::float8 AS dl"
            f"        FROM hits h CROSS JOIN unnest(${n + 2}::text[], ${n + 3}::float8[])"
            "        AS q(tok, w)),"
            " ranked AS (SELECT tf.id,"
            f"   sum(tf.w * tf.tf * ${n + 4}::float8 / (tf.tf + ${n + 5}::float8"
            f"       * (1.0::float8 - ${n + 6}::float8 + ${n + 6}::float8 * tf.dl / avgdl.v)))"
            "     AS score,"
            f"   sum(CASE WHEN tf.tf > 0 THEN tf.w ELSE 0 END) / ${n + 7}::float8 AS coverage"
            "   FROM tf CROSS JOIN avgdl GROUP BY tf.id HAVING sum(tf.tf) > 0"
            f"   ORDER BY score DESC, tf.id LIMIT ${n + 8})"
            f" SELECT r.score, r.coverage, {_HIT_COLS} FROM ranked r"
            " JOIN knowledge_chunks c ON c.id = r.id"
            " JOIN knowledge_sources k ON k.id = c.source_id ORDER BY r.score DESC, r.id"
        )

        async def body(conn: Conn) -> list[Any]:
            lexemes = [_tsquery_lexeme(t) for t in terms]
            async with conn.transaction(readonly=True):
                await conn.execute("SET LOCAL enable_seqscan = off")
                n_docs = int(await conn.fetchval(count_sql, *params))
                stats = await conn.fetchrow(stats_sql, *params, df_cap(n_docs), *lexemes)
                df = dict(zip(terms, (int(x) for x in stats["df"]), strict=True))
                plan = keyword_plan(terms, df, n_docs)
                if plan is None:
                    return []
                tsquery = " | ".join(_tsquery_lexeme(t) for t in plan.terms)
                return list(
                    await conn.fetch(
                        score_sql,
                        *params,
                        tsquery,
                        list(plan.terms),
                        list(plan.weights),
                        BM25_K1 + 1.0,
                        BM25_K1,
                        BM25_B,
                        plan.total_weight,
                        top_k,
                    )
                )

        rows = await self._run("keyword search", body, read_replica=True)
        return [
            dataclasses.replace(
                _hit(r, max(float(r["score"]), 1e-9), similarity=False),
                coverage=float(r["coverage"]),
            )
            for r in rows
        ]

    # --- re-embedding ---------------------------------------------------------------

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
        async def body(conn: Conn) -> list[PendingChunk]:
            rows = await conn.fetch(
                "SELECT c.id, c.source_id, c.content FROM knowledge_chunks c"
                " WHERE NOT EXISTS (SELECT 1 FROM reembed_vectors r WHERE r.chunk_id = c.id)"
                " ORDER BY c.id LIMIT $1",
                max(int(limit), 0),
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
                "UPDATE knowledge_sources s SET status = CASE WHEN EXISTS (SELECT 1 FROM"
                " knowledge_chunks c WHERE c.source_id = s.id AND c.embedding IS NULL)"
                " THEN 'pending' ELSE 'ready' END"
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

    # --- job leases -----------------------------------------------------------------

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

    # --- maintenance ----------------------------------------------------------------

    async def rebuild_vector_index(self) -> None:
        """(Re)build the configured ANN index without blocking searches (CONCURRENTLY)."""
        building = ANN_INDEX_NAME + "_new"

        async def body(conn: Conn) -> None:
            config = await self._read_config(conn)
            if config is None:
                return
            # Session-level lock: CREATE INDEX CONCURRENTLY cannot run in a transaction.
            await conn.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK_KEY)
            try:
                await conn.execute(f"DROP INDEX IF EXISTS {building}")
                built = await self._create_ann_index(
                    conn, config.dimension, concurrently=True, name=building
                )
                async with conn.transaction():
                    await conn.execute(f"DROP INDEX IF EXISTS {ANN_INDEX_NAME}")
                    if built:
                        await conn.execute(f"ALTER INDEX {building} RENAME TO {ANN_INDEX_NAME}")
            except BaseException:
                if not conn.is_closed():
                    await conn.execute(f"DROP INDEX IF EXISTS {building}")
                raise
            finally:
                if not conn.is_closed():
                    await conn.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK_KEY)

        await self._run("rebuilding the vector index", body)

    async def _maybe_build_ivfflat(self) -> None:
        """IVFFlat needs rows to train on: build it once there are enough."""
        if self._index_type != "ivfflat" or self._config is None:
            return

        async def missing(conn: Conn) -> bool:
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", ANN_INDEX_NAME)
            if exists:
                return False
            rows = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks WHERE embedding IS NOT NULL"
                " LIMIT $1) AS s",
                IVFFLAT_MIN_ROWS,
            )
            return bool(rows >= IVFFLAT_MIN_ROWS)

        if await self._run("checking the vector index", missing):
            await self.rebuild_vector_index()

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


# --- helpers -------------------------------------------------------------------------


def _check_chunk_scope(guild_id: int, chunks: Sequence[KnowledgeChunk], where: str) -> None:
    for c in chunks:
        if c.guild_id is not None and c.guild_id != guild_id:
            raise InvalidInputError(
                f"{where} chunk {c.chunk_key!r}: guild_id {c.guild_id} differs from the"
                f" source's {guild_id}"
            )


def _filter_sql(wanted: Mapping[str, list[Any]], params: list[Any]) -> str:
    """Metadata filters as JSONB containment (served by the jsonb_path_ops GIN index).

    Containment compares JSON types: 1 matches 1 and 1.0 but not "1" or true.
    Single-valued keys share one containment; a list becomes an OR of containments.
    """
    if not wanted:
        return ""
    clauses: list[str] = []
    equal = {k: v[0] for k, v in wanted.items() if len(v) == 1}
    if equal:
        params.append(json.dumps(equal, ensure_ascii=False))
        clauses.append(f"c.metadata @> ${len(params)}::jsonb")
    for key, values in wanted.items():
        if len(values) == 1:
            continue
        alts = []
        for v in values:
            params.append(json.dumps({key: v}, ensure_ascii=False))
            alts.append(f"c.metadata @> ${len(params)}::jsonb")
        clauses.append("(" + " OR ".join(alts) + ")")
    return " AND " + " AND ".join(clauses)


def _renumber(sql: str, shift: int) -> str:
    """Shift $n placeholders down by ``shift`` (to reuse a clause without $1)."""
    import re

    return re.sub(r"\$(\d+)", lambda m: f"${int(m[1]) - shift}", sql)


def vector_scope(
    query: Vector, guild_id: int, channel_id: int | None, wanted: Mapping[str, list[Any]]
) -> tuple[str, list[Any]]:
    """WHERE clause and parameters of a vector search ($1 is the query vector)."""
    params: list[Any] = [query, guild_id]
    scope = "c.guild_id = $2"
    if channel_id is not None:
        params.append(channel_id)
        scope += f" AND c.channel_id = ${len(params)}"
    scope += " AND c.embedding IS NOT NULL" + _filter_sql(wanted, params)
    return scope, params


def exact_search_sql(scope: str, limit_param: int) -> str:
    """Exact search of a scope: distances for every row, then a top-k sort.

    MATERIALIZED keeps the planner from turning this into an (approximate) index scan.
    """
    return (
        "WITH s AS MATERIALIZED ("
        "  SELECT c.id, c.embedding <=> $1::vector AS dist FROM knowledge_chunks c"
        f"  WHERE {scope})"
        f" SELECT r.dist, {_HIT_COLS} FROM"
        f" (SELECT id, dist FROM s ORDER BY dist, id LIMIT ${limit_param}) AS r"
        " JOIN knowledge_chunks c ON c.id = r.id JOIN knowledge_sources k ON k.id = c.source_id"
        " ORDER BY r.dist, r.id"
    )


def _hit(r: Any, score: float, *, similarity: bool) -> SearchHit:
    return SearchHit(
        chunk_id=r["id"],
        source_id=r["source_id"],
        content=r["content"],
        score=score,
        guild_id=r["guild_id"],
        channel_id=r["channel_id"],
        metadata=json.loads(r["metadata"]),
        chunk_index=r["chunk_index"],
        similarity=score if similarity else None,
        source_title=r["title"],
        source_uri=r["uri"],
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
