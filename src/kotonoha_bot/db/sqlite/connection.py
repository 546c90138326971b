"""SQLite plumbing: the one connection every SQLite operation goes through.

One long-lived connection (WAL, foreign keys, busy timeout, synchronous=FULL so an
acknowledged turn survives a power cut). Every operation runs under one asyncio
lock, so the statements of one transaction never interleave with another
coroutine's. Vectors are float32 BLOBs on disk and compact codes in memory
(``VectorCache``, int4 by default): a search shortlists by code score and re-ranks the
shortlist by exact float32 cosine read from the BLOBs, so similarities are exact. The
cache is updated only after a transaction commits and reloaded when another process
changed the file (``PRAGMA data_version``).

The mixins of :class:`~kotonoha_bot.db.sqlite.database.SQLiteDatabase` (sessions in
``database.py``, ``knowledge.py``, ``search.py``, ``provenance.py``, ``memories.py``)
build on :class:`SQLiteConnection`: ``_read``/``_write`` are the only ways to the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import aiosqlite
import numpy as np

from kotonoha_bot.db import sqlite_path_from_url
from kotonoha_bot.db.checks import (
    config_from_meta,
)
from kotonoha_bot.db.contract import AsyncLifecycle
from kotonoha_bot.db.sqlite.files import OURS, check_openable, create_private, translate
from kotonoha_bot.db.sqlite.schema import LATEST_SCHEMA_VERSION, MIGRATIONS, split_sql
from kotonoha_bot.db.sqlite.values import ts as _ts
from kotonoha_bot.db.sqlite.vector_cache import DEFAULT_CACHE_KIND, CacheKind, VectorCache
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.errors import (
    DatabaseError,
    ForeignDatabaseError,
    SchemaError,
)
from kotonoha_bot.models import (
    EmbeddingConfig,
    Vector,
    utcnow,
)

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings


#: Extra BEGIN IMMEDIATE attempts (each waits up to the busy timeout) before giving up.
_BUSY_RETRIES = 5


def to_blob(vector: Vector) -> bytes:
    """A vector as the little-endian float32 BLOB stored on disk."""
    return vector.astype("<f4", copy=False).tobytes()


def from_blob(blob: bytes) -> Vector:
    """A stored BLOB back as a float32 vector."""
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


async def rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open: SQLite has already undone it after some errors
    (a full disk), and a second ROLLBACK would hide the real error behind "no transaction"."""
    if conn.in_transaction:
        await conn.execute("ROLLBACK")


class SQLiteConnection(AsyncLifecycle):
    """The one connection to the file, its lock and transactions, and the vector cache."""

    def __init__(self, url: str | DatabaseURL, *, settings: Settings | None = None) -> None:
        self.path: Path = sqlite_path_from_url(url)
        self._busy_timeout_ms = settings.sqlite_busy_timeout_ms if settings else 5000
        self._cache_kind: CacheKind = (
            settings.sqlite_vector_cache if settings else DEFAULT_CACHE_KIND
        )
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
                for statement in split_sql(sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, _ts(utcnow())),
                )
            await conn.execute("COMMIT")
        except BaseException:
            await rollback(conn)
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

    # _read/_write are typed as plain context managers so the mixins that declare them
    # (provenance.py, memories.py) agree with this definition.
    def _read(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        """The connection under the lock, for reads; errors become typed errors."""
        return self._reading(what)

    def _write(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        """A write transaction (BEGIN IMMEDIATE) under the lock; rolled back on any error."""
        return self._writing(what)

    @asynccontextmanager
    async def _reading(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._errors(what):
            yield self._c()

    @asynccontextmanager
    async def _writing(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._errors(what):
            conn = self._c()
            await self._begin(conn)
            try:
                yield conn
            except BaseException:
                await rollback(conn)
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
