"""PostgreSQL plumbing: the pool (and read pool), connection setup, retries, typed errors.

:class:`PostgresConnection` owns the asyncpg pools and everything a statement needs to
run: ``_run`` retries a body once on a dropped connection and translates driver errors
into the typed hierarchy (no password in any message), ``_read_config`` reads the
recorded embedding model. The mixins of
:class:`~kotonoha_bot.db.postgres.database.PostgreSQLDatabase` build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import asyncpg.exceptions as pgerr
import numpy as np
from pgvector import Vector as PgVector
from pgvector.asyncpg import register_vector

from kotonoha_bot.db.checks import (
    config_from_meta,
)
from kotonoha_bot.db.contract import (
    CAP_ANN_INDEX,
    CAP_MULTI_PROCESS,
    CAP_READ_REPLICA,
    CAP_SERVER,
    AsyncLifecycle,
)
from kotonoha_bot.db.postgres.schema import (
    CREATE_MIGRATIONS_TABLE,
    LATEST_SCHEMA_VERSION,
    MIGRATIONS,
    SCHEMA_LOCK_KEY,
    IndexType,
)
from kotonoha_bot.db.postgres.search_plan import (
    HNSW_EF_SEARCH_MAX,
    IndexPrecision,
    ef_search_for,
)
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    DiskFullError,
    InvalidTextError,
    KotonohaError,
    PoolTimeoutError,
    ReadOnlyDatabaseError,
    SchemaError,
)
from kotonoha_bot.models import (
    EmbeddingConfig,
    Vector,
)
from kotonoha_bot.redact import redact, register_secret

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


def _pgvec(vector: Vector) -> PgVector:
    """Wrap for the binary codec (a bare ndarray inside an array parameter looks nested)."""
    return PgVector(vector)


def _to_numpy(value: Any) -> Vector:
    arr: Vector = np.array(value.to_numpy(), dtype=np.float32)
    return arr


def _register_url_secrets(url: DatabaseURL) -> None:
    for secret in url.secrets:
        register_secret(secret)


class SearchConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """A pooled connection that knows the ``hnsw.ef_search`` it was opened with.

    The pools change their connections' ef_search as the table grows
    (``PostgresConnection._follow_table_size``); a search compares what it needs with
    what its own connection carries, so one opened before a change is never trusted
    to hold the new value.
    """

    #: The session default read back from the server when the connection was opened.
    ef_search: int | None = None
    _session_untouched = False

    def session_untouched(self) -> None:
        """Its current user changes no session state (no SET, cursor, LISTEN or
        advisory lock; SET LOCAL ends with its transaction), so handing it back to the
        pool needs no reset statement: a search is then one round trip, not two.

        An open transaction is still rolled back on release (asyncpg always does that).
        """
        self._session_untouched = True

    def get_reset_query(self) -> str:
        """asyncpg's reset (RESET ALL etc.), skipped once after ``session_untouched``."""
        if self._session_untouched:
            self._session_untouched = False
            return ""
        query: str = super().get_reset_query()
        return query


async def _init_connection(conn: Conn) -> None:
    """Pool ``init``: the binary pgvector codecs (vector, halfvec, sparsevec), and the
    connection's own ef_search (asked, not assumed: the pool's arguments may have changed
    while it connected)."""
    await register_vector(conn)
    value = await conn.fetchval("SHOW hnsw.ef_search")
    conn.ef_search = int(value) if str(value).isdigit() else None


class PostgresConnection(AsyncLifecycle):
    """The pools and the plumbing every PostgreSQL operation runs through."""

    backend_name = "postgresql"
    #: The schema this code expects (the health check and the dashboard compare it).
    latest_schema_version = LATEST_SCHEMA_VERSION

    capabilities: frozenset[str] = frozenset({CAP_ANN_INDEX, CAP_MULTI_PROCESS, CAP_SERVER})

    def __init__(self, url: str | DatabaseURL, *, settings: Settings) -> None:
        self._url = DatabaseURL.parse(url)
        self._dsn = self._url.dsn()
        _register_url_secrets(self._url)
        self._read_url = (
            DatabaseURL.parse(settings.database_read_url) if settings.database_read_url else None
        )
        self._read_dsn = self._read_url.dsn() if self._read_url else None
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
        #: Bumped whenever the pools' connect arguments change (see _follow_table_size).
        self._pool_generation = 0
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

    # --- lifecycle ------------------------------------------------------------

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
            self._pool_ef = self._graph_ef()
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
                init=_init_connection,
                connection_class=SearchConnection,
                **self._pool_connect_kwargs(),
            ),
            where=where,
        )

    def _pool_connect_kwargs(self) -> dict[str, Any]:
        """What every pooled connection is opened with (also when the settings change)."""
        return {
            "timeout": self._acquire_timeout,
            "command_timeout": self._command_timeout,
            # JIT compilation costs more than it saves on these short queries. The
            # vector-search settings are session defaults of every pooled connection
            # (they survive asyncpg's RESET ALL on release), so an ordinary search is
            # one statement: no transaction and SET LOCAL round trips around it.
            "server_settings": {
                "application_name": "kotonoha-bot",
                "jit": "off",
                **self._search_settings(),
            },
        }

    async def _follow_table_size(self, table_rows: int) -> None:
        """Record the table's size; when it moves ef_search to another band, the pools follow.

        The pooled connections carry ef_search as a session default (one statement per
        search). When the graph grows (or shrinks) past a step of ``ef_search_for`` (or
        the embedding width changes), the pools get the new value for every connection
        they open from now on and their open connections are expired (asyncpg replaces
        each on its next acquire, or on release when it is in use), so the usual search
        stays one statement instead of a transaction with ``SET LOCAL``. Until a
        connection is replaced, searches on it use ``SET LOCAL``
        (``_needs_local_settings`` compares with the value the connection reported when
        it was opened), so no search runs with the old value.
        """
        self._table_rows = table_rows
        ef = self._graph_ef()
        if ef == self._pool_ef:
            return
        self._pool_ef = ef
        self._pool_generation += 1
        kwargs = self._pool_connect_kwargs()
        for pool, dsn in ((self._pool, self._dsn), (self._read_pool, self._read_dsn)):
            if pool is not None:
                pool.set_connect_args(dsn, **kwargs)
                await pool.expire_connections()
        log.info("hnsw.ef_search of pooled connections now %d (%d rows)", ef, table_rows)

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

    # --- plumbing -------------------------------------------------------------

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

    # --- for the raw-row module beside this one (db/postgres/rows.py) ---------

    def translate_error(self, what: str, exc: BaseException) -> KotonohaError | None:
        """The typed error for a driver exception on this database (None: not ours)."""
        return self._translate(what, exc)

    def require_pool(self) -> Any:
        """The write pool of an open database (DatabaseError when it is not open)."""
        return self._require_pool()

    @property
    def connect_dsn(self) -> str:
        """The asyncpg DSN, password included: pass it to a driver, never print it."""
        return self._dsn

    @property
    def acquire_timeout(self) -> float:
        """Seconds to wait for a connection (DATABASE_ACQUIRE_TIMEOUT)."""
        return self._acquire_timeout

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

    # --- search ---------------------------------------------------------------

    def _default_ef_search(self) -> int:
        """The pooled connections' ef_search: the setting, else by the size at start-up."""
        return self._pool_ef

    def _graph_ef(self) -> int:
        """ef_search for the graph's size and width (the setting when pinned)."""
        dimension = self._config.dimension if self._config else None
        return ef_search_for(self._table_rows, self._settings.hnsw_ef_search, dimension)

    def _ef_search(self, limit: int) -> int:
        """This search's ef_search: by the graph's size, never below the candidates wanted,
        never above pgvector's limit (``HNSW_EF_SEARCH_MAX``)."""
        return min(HNSW_EF_SEARCH_MAX, max(self._graph_ef(), limit))

    def _search_settings(self) -> dict[str, str]:
        """Connection defaults for approximate search (both index types, pgvector 0.8+)."""
        settings = self._settings
        return {
            "hnsw.ef_search": str(self._default_ef_search()),
            "hnsw.iterative_scan": "relaxed_order",
            "ivfflat.probes": str(settings.ivfflat_probes),
            "ivfflat.iterative_scan": "relaxed_order",
        }
