"""Raw row access to a PostgreSQL database for the transfer tool (export, import, checks).

It borrows one pooled connection from a :class:`PostgreSQLDatabase` (so the binary
pgvector codec is registered) and keeps it for the whole job. A reader holds one
REPEATABLE READ, read-only transaction: every table is read from the same snapshot,
like the online backup of a SQLite source. A writer loads each batch with binary
``COPY`` (``copy_records_to_table``; vectors in pgvector's binary format) in its own
transaction, so an interrupted job leaves whole batches only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import asyncpg.exceptions as pgerr
import numpy as np

from kotonoha_bot.db.postgres.database import PostgreSQLDatabase
from kotonoha_bot.db.postgres.schema import ANN_INDEX_NAME
from kotonoha_bot.db.tables import (
    INTEGRITY_CHECKS,
    SEQUENCED,
    TABLES,
    TRANSIENT_TABLES,
    Row,
    TableSpec,
)
from kotonoha_bot.errors import DatabaseError, KotonohaError

_DATA_ERRORS = (pgerr.DataError, pgerr.IntegrityConstraintViolationError)


def _translate(db: PostgreSQLDatabase, what: str, exc: BaseException) -> BaseException:
    if isinstance(exc, KotonohaError):
        return exc
    translated = db.translate_error(what, exc)
    return translated if translated is not None else exc


def _vector_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return np.asarray(value.to_numpy(), dtype="<f4").tobytes()


def _adapt_record(spec: TableSpec, row: Row) -> tuple[Any, ...]:
    """A canonical row as COPY wants it (vectors as float32 arrays for the binary codec)."""
    if "embedding" in spec.names:
        i = spec.names.index("embedding")
        value = row[i]
        if value is not None:
            return (*row[:i], np.frombuffer(value, dtype="<f4"), *row[i + 1 :])
    return row


@dataclass(frozen=True)
class PgInfo:
    """What a PostgreSQL database holds, read without creating anything."""

    has_schema: bool
    schema_version: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    server_version_num: int = 0


async def inspect_database(db: PostgreSQLDatabase) -> PgInfo:
    """Classify the (not yet initialised) database without migrating it."""
    what = f"inspecting {db.location}"
    try:
        conn = await asyncpg.connect(db.connect_dsn, timeout=db.acquire_timeout)
    except BaseException as exc:
        raise _translate(db, what, exc) from None
    try:
        version_num = int(await conn.fetchval("SHOW server_version_num"))
        exists = await conn.fetchval("SELECT to_regclass('kotonoha_meta') IS NOT NULL")
        if not exists:
            return PgInfo(False, server_version_num=version_num)
        schema = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
        # A database of an older schema lacks the newer tables: count what exists.
        present = {
            r["name"]
            for r in await conn.fetch(
                "SELECT t AS name FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
                [t.name for t in TABLES],
            )
        }
        counts = {
            t.name: int(await conn.fetchval(f"SELECT count(*) FROM {t.name}"))
            for t in TABLES
            if t.name in present
        }
        meta = {
            r["key"]: r["value"] for r in await conn.fetch("SELECT key, value FROM kotonoha_meta")
        }
        return PgInfo(True, schema, counts, meta, version_num)
    except BaseException as exc:
        raise _translate(db, what, exc) from None
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


class PostgresRows:
    """One connection of an open PostgreSQLDatabase, for raw rows."""

    kind = "postgresql"

    def __init__(self, db: PostgreSQLDatabase, *, snapshot: bool) -> None:
        self.db = db
        self.snapshot = snapshot
        self._conn: Any = None
        self._tx: Any = None

    @property
    def location(self) -> str:
        return self.db.location

    async def _guarded(self, what: str, coro: Any) -> Any:
        """Await ``coro``; a driver error becomes the database's typed error."""
        try:
            return await coro
        except BaseException as exc:
            raise _translate(self.db, what, exc) from None

    def _connection(self) -> Any:
        """The open connection (DatabaseError before ``open``)."""
        if self._conn is None:
            raise DatabaseError(f"{self.location} is not open")
        return self._conn

    async def open(self) -> None:
        pool = self.db.require_pool()
        self._conn = await self._guarded(
            "connecting", pool.acquire(timeout=self.db.acquire_timeout)
        )
        if self.snapshot:
            self._tx = self._conn.transaction(isolation="repeatable_read", readonly=True)
            await self._guarded("starting a snapshot", self._tx.start())

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            if self._tx is not None and not conn.is_closed():
                await self._tx.rollback()
        self._tx = None
        with contextlib.suppress(Exception):
            await self.db.require_pool().release(conn)

    async def export_snapshot(self) -> str:
        """The id of this reader's snapshot, for ``pg_dump --snapshot`` (same rows)."""
        if self._tx is None:
            raise DatabaseError("only a snapshot reader can export its snapshot")
        return str(
            await self._guarded(
                "exporting the snapshot", self._connection().fetchval("SELECT pg_export_snapshot()")
            )
        )

    # --- reading ------------------------------------------------------------------

    def _select(self, spec: TableSpec) -> str:
        return f"SELECT {', '.join(spec.names)} FROM {spec.name}"

    def _raw(self, spec: TableSpec, records: Sequence[Any]) -> list[tuple[Any, ...]]:
        if "embedding" not in spec.names:
            return [tuple(r) for r in records]
        i = spec.names.index("embedding")
        out = []
        for r in records:
            values = list(r)
            values[i] = _vector_bytes(values[i])
            out.append(tuple(values))
        return out

    async def read_all(self, spec: TableSpec) -> list[tuple[Any, ...]]:
        records = await self._guarded(
            f"reading {spec.name}", self._connection().fetch(self._select(spec))
        )
        return self._raw(spec, records)

    async def batches(
        self, spec: TableSpec, *, after: int | None, size: int
    ) -> AsyncIterator[list[tuple[Any, ...]]]:
        sql = f"{self._select(spec)} WHERE {spec.key} > $1 ORDER BY {spec.key} LIMIT $2"
        last = -(2**63) if after is None else after
        index = spec.key_index
        while True:
            records = await self._guarded(
                f"reading {spec.name}", self._connection().fetch(sql, last, size)
            )
            if not records:
                return
            rows = self._raw(spec, records)
            yield rows
            last = rows[-1][index]
            if len(rows) < size:
                return

    async def keys(self, spec: TableSpec, upto: int | None = None) -> list[int]:
        sql = f"SELECT {spec.key} FROM {spec.name}"
        args: list[Any] = []
        if upto is not None:
            sql += f" WHERE {spec.key} <= $1"
            args.append(upto)
        sql += f" ORDER BY {spec.key}"
        records = await self._guarded(
            f"reading {spec.name} keys", self._connection().fetch(sql, *args)
        )
        return [int(r[0]) for r in records]

    async def fetch(self, spec: TableSpec, keys: Sequence[int]) -> list[tuple[Any, ...]]:
        sql = f"{self._select(spec)} WHERE {spec.key} = ANY($1::bigint[]) ORDER BY {spec.key}"
        records = await self._guarded(
            f"reading {spec.name}", self._connection().fetch(sql, list(keys))
        )
        return self._raw(spec, records)

    async def max_key(self, spec: TableSpec) -> int | None:
        value = await self._guarded(
            f"reading {spec.name}",
            self._connection().fetchval(f"SELECT max({spec.key}) FROM {spec.name}"),
        )
        return None if value is None else int(value)

    async def count(self, spec: TableSpec) -> int:
        return int(
            await self._guarded(
                f"counting {spec.name}",
                self._connection().fetchval(f"SELECT count(*) FROM {spec.name}"),
            )
        )

    async def sequence_marks(self) -> dict[str, int]:
        """The identity sequences' high-water marks (ids never handed out twice)."""
        marks: dict[str, int] = {}
        conn = self._connection()
        for table in SEQUENCED:
            seq = await self._guarded(
                "reading sequences", conn.fetchval("SELECT pg_get_serial_sequence($1, 'id')", table)
            )
            if seq is None:
                continue
            row = await self._guarded(
                "reading sequences", conn.fetchrow(f"SELECT last_value, is_called FROM {seq}")
            )
            marks[table] = int(row["last_value"]) if row["is_called"] else 0
        return marks

    # --- writing ------------------------------------------------------------------

    async def insert(self, spec: TableSpec, rows: Sequence[Row]) -> list[tuple[Row, str]]:
        """COPY canonical rows in one transaction; on a data error retry row by row."""
        conn = self._connection()
        records = [_adapt_record(spec, r) for r in rows]
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(
                    spec.name, records=records, columns=list(spec.names)
                )
            return []
        except _DATA_ERRORS:
            pass
        except BaseException as exc:
            raise _translate(self.db, f"writing {spec.name}", exc) from None
        sql = (
            f"INSERT INTO {spec.name} ({', '.join(spec.names)}) VALUES"
            f" ({', '.join(f'${i + 1}' for i in range(len(spec.names)))})"
        )
        failed: list[tuple[Row, str]] = []
        try:
            async with conn.transaction():
                for row, record in zip(rows, records, strict=True):
                    try:
                        async with conn.transaction():
                            await conn.execute(sql, *record)
                    except _DATA_ERRORS as exc:
                        failed.append((row, f"the target refused it: {exc}"))
        except BaseException as exc:
            raise _translate(self.db, f"writing {spec.name}", exc) from None
        return failed

    async def set_meta(self, key: str, value: str) -> None:
        await self._guarded(
            "writing kotonoha_meta",
            self._connection().execute(
                "INSERT INTO kotonoha_meta (key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                key,
                value,
            ),
        )

    async def delete_meta(self, key: str) -> None:
        await self._guarded(
            "writing kotonoha_meta",
            self._connection().execute("DELETE FROM kotonoha_meta WHERE key = $1", key),
        )

    async def fix_message_counts(self) -> int:
        status = await self._guarded(
            "updating message counts",
            self._connection().execute(
                "UPDATE sessions s SET message_count = c.n FROM (SELECT s2.session_key,"
                " (SELECT count(*) FROM messages m WHERE m.session_key = s2.session_key) AS n"
                " FROM sessions s2) c WHERE c.session_key = s.session_key"
                " AND s.message_count <> c.n"
            ),
        )
        return int(str(status).rsplit(" ", 1)[-1])

    async def set_sequences(self, marks: dict[str, int]) -> None:
        conn = self._connection()
        for table in SEQUENCED:
            high = max(
                marks.get(table, 0),
                int(
                    await self._guarded(
                        "advancing sequences",
                        conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {table}"),
                    )
                ),
            )
            seq = await self._guarded(
                "advancing sequences",
                conn.fetchval("SELECT pg_get_serial_sequence($1, 'id')", table),
            )
            if high > 0:
                await self._guarded(
                    "advancing sequences",
                    conn.execute("SELECT setval($1::regclass, $2, true)", seq, high),
                )
            else:
                await self._guarded(
                    "advancing sequences",
                    conn.execute("SELECT setval($1::regclass, 1, false)", seq),
                )

    async def wipe(self) -> None:
        tables = [t.name for t in TABLES]
        for name in TRANSIENT_TABLES:
            if await self._guarded(
                "wiping", self._connection().fetchval("SELECT to_regclass($1)", name)
            ):
                tables.append(name)
        await self._guarded(
            "wiping", self._connection().execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
        )

    async def drop_vector_index(self) -> None:
        """Bulk loads are far faster without the ANN index; rebuild it afterwards."""
        await self._guarded(
            "dropping the vector index",
            self._connection().execute(f"DROP INDEX IF EXISTS {ANN_INDEX_NAME}"),
        )

    async def analyze(self) -> None:
        names = ", ".join(t.name for t in TABLES)
        await self._guarded("analysing", self._connection().execute(f"ANALYZE {names}"))

    async def integrity(self) -> dict[str, int]:
        checks = INTEGRITY_CHECKS
        return {
            name: int(await self._guarded("checking references", self._connection().fetchval(sql)))
            for name, sql in checks.items()
        }
