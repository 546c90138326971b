"""Raw row access to SQLite files for the transfer tool (export, import, checks, backups).

This works below the storage contract on purpose: it reads rows exactly as stored
(TEXT undecoded as :class:`RawText`, so invalid UTF-8 is reported instead of raising),
writes canonical rows with their ids, and never runs the backend's migrations on a
file it only reads. Every call runs the stdlib ``sqlite3`` driver in a worker thread,
one batch per hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

from kotonoha_bot.db.sqlite.files import OURS, create_private, translate
from kotonoha_bot.db.sqlite.schema import LATEST_SCHEMA_VERSION, MIGRATIONS, split_sql
from kotonoha_bot.db.tables import (
    INTEGRITY_CHECKS,
    SEQUENCED,
    TABLES,
    TRANSIENT_TABLES,
    RawText,
    Row,
    TableSpec,
)
from kotonoha_bot.errors import (
    CorruptDatabaseError,
    DatabaseError,
    DatabaseUnavailableError,
    SchemaError,
)

T = TypeVar("T")

#: Tables that belong to the current schema (anything else in a file is reported).
KNOWN_TABLES = frozenset(
    {t.name for t in TABLES}
    | set(TRANSIENT_TABLES)
    | {"schema_migrations", "sqlite_sequence"}
    | {
        "knowledge_chunks_fts",
        "knowledge_chunks_fts_data",
        "knowledge_chunks_fts_idx",
        "knowledge_chunks_fts_docsize",
        "knowledge_chunks_fts_config",
        "knowledge_chunks_fts_content",
    }
)


def _ro_uri(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A sqlite3 connection for raw work: read-only by URI, or autocommit read-write."""
    if readonly:
        if not path.is_file():
            raise DatabaseUnavailableError(f"{path}: no such SQLite file")
        conn = sqlite3.connect(_ro_uri(path), uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


# --- whole-file operations ------------------------------------------------------------


def integrity_check(path: Path) -> None:
    """``PRAGMA integrity_check`` on ``path`` (read-only); raise CorruptDatabaseError."""
    try:
        conn = connect(path, readonly=True)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CorruptDatabaseError(f"{path} failed the integrity check: {exc}") from None
    problems = [str(r[0]) for r in rows if r[0] != "ok"]
    if problems:
        shown = "; ".join(problems[:3]) + (
            f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        )
        raise CorruptDatabaseError(f"{path} failed the integrity check: {shown}")


def online_backup(source: Path, dest: Path) -> None:
    """Copy a live database with SQLite's online backup API (WAL content included)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    # Private from the first byte (a backup holds a community's conversations).
    create_private(partial)
    try:
        src = connect(source, readonly=True)
        try:
            out = sqlite3.connect(partial)
            try:
                src.backup(out)
                # A backup is one self-contained file: no -wal beside it.
                out.execute("PRAGMA journal_mode = DELETE")
            finally:
                out.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise translate(source, "backing up", exc) from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DatabaseError(f"backing up {source} to {dest}: {exc.strerror}") from None
    # A backup holds a community's conversations: readable by its owner only.
    with contextlib.suppress(OSError):
        partial.chmod(0o600)
    partial.replace(dest)


def finalize_file(path: Path) -> None:
    """Fold the WAL into the file and leave it self-contained (no -wal, no -shm)."""
    try:
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA journal_mode = DELETE")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise translate(path, "finishing", exc) from None


@dataclass(frozen=True)
class FileInfo:
    """What a SQLite file holds: ``kind`` is current, legacy, empty or missing."""

    kind: str
    schema_version: int = 0
    tables: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def unknown_tables(self) -> list[str]:
        return sorted(t for t in self.tables if t not in KNOWN_TABLES)


def inspect_file(path: Path) -> FileInfo:
    """Classify a file without writing to it (it is never created)."""
    if not path.exists():
        return FileInfo("missing")
    try:
        conn = connect(path, readonly=True)
        try:
            tables = tuple(
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            )
            if not tables:
                return FileInfo("empty")
            if set(tables) >= OURS:
                version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
                counts = {
                    t.name: int(conn.execute(f"SELECT count(*) FROM {t.name}").fetchone()[0])
                    for t in TABLES
                    if t.name in tables
                }
                conn.text_factory = lambda b: b.decode("utf-8", "replace")
                meta = (
                    dict(conn.execute("SELECT key, value FROM kotonoha_meta").fetchall())
                    if "kotonoha_meta" in tables
                    else {}
                )
                return FileInfo("current", int(version or 0), tables, counts, meta)
            if "sessions" in tables:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
                if "messages" in columns and "session_key" in columns:
                    count = int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
                    return FileInfo("legacy", 0, tables, {"sessions": count})
            return FileInfo("unknown", 0, tables)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise translate(path, "inspecting", exc) from None


def create_schema(conn: sqlite3.Connection) -> None:
    """Apply the SQLite backend's migrations on ``conn`` (inside the caller's transaction)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    for version, name, sql in MIGRATIONS:
        for statement in split_sql(sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (version, name, now),
        )


def check_schema_version(path: Path, version: int) -> None:
    """A newer schema than this code knows cannot be read faithfully."""
    if version > LATEST_SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has schema version {version}, newer than this kotonoha-bot understands"
            f" ({LATEST_SCHEMA_VERSION}); upgrade kotonoha-bot"
        )


def check_columns(path: Path) -> None:
    """Every column the transfer moves must exist (an older schema may lack one)."""
    try:
        conn = connect(path, readonly=True)
        try:
            for spec in TABLES:
                have = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({spec.name})")}
                missing = [c for c in spec.names if c not in have]
                if missing:
                    raise SchemaError(
                        f"{path}: table {spec.name} lacks {', '.join(missing)} (an older"
                        " schema); upgrade a copy with `kotonoha db init --database"
                        " sqlite:///COPY` and migrate from the copy"
                    )
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise translate(path, "inspecting", exc) from None


# --- rows -----------------------------------------------------------------------------


def _insert_sql(spec: TableSpec) -> str:
    cols = ", ".join(spec.names)
    marks = ", ".join("?" * len(spec.names))
    return f"INSERT INTO {spec.name} ({cols}) VALUES ({marks})"


def _adapt(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _adapt_row(row: Row) -> tuple[Any, ...]:
    return tuple(_adapt(v) for v in row)


def insert_rows(
    conn: sqlite3.Connection, spec: TableSpec, rows: Sequence[Row]
) -> list[tuple[Row, str]]:
    """Insert canonical rows inside the caller's transaction.

    A batch that breaks a constraint is retried row by row under savepoints; the rows
    the database refuses come back with its reason (nothing is skipped silently).
    """
    sql = _insert_sql(spec)
    adapted = [_adapt_row(r) for r in rows]
    conn.execute("SAVEPOINT kotonoha_batch")
    try:
        conn.executemany(sql, adapted)
    except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError, OverflowError):
        conn.execute("ROLLBACK TO kotonoha_batch")
    else:
        conn.execute("RELEASE kotonoha_batch")
        return []
    conn.execute("RELEASE kotonoha_batch")
    failed: list[tuple[Row, str]] = []
    for row, values in zip(rows, adapted, strict=True):
        conn.execute("SAVEPOINT kotonoha_row")
        try:
            conn.execute(sql, values)
        except (
            sqlite3.IntegrityError,
            sqlite3.InterfaceError,
            sqlite3.DataError,
            OverflowError,
        ) as exc:
            conn.execute("ROLLBACK TO kotonoha_row")
            failed.append((row, f"the target refused it: {exc}"))
        conn.execute("RELEASE kotonoha_row")
    return failed


class SQLiteRows:
    """One SQLite file opened for raw rows: read-only (a source) or read-write (a target)."""

    kind = "sqlite"

    def __init__(self, path: Path, *, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None

    @property
    def location(self) -> str:
        return f"sqlite:///{self.path}"

    async def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise DatabaseError(f"{what}: {self.path} is not open")

        def run() -> T:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if not self.readonly and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise translate(self.path, what, exc) from None

        return await asyncio.to_thread(run)

    async def open(self) -> None:
        def open_connection() -> sqlite3.Connection:
            try:
                conn = connect(self.path, readonly=self.readonly)
                conn.text_factory = RawText
                if not self.readonly:
                    conn.execute("PRAGMA journal_mode = WAL")
                    # Each batch commits; a crash loses at most the batch being written,
                    # which a rerun writes again.
                    conn.execute("PRAGMA synchronous = NORMAL")
                    conn.execute("PRAGMA foreign_keys = ON")
                return conn
            except sqlite3.Error as exc:
                raise translate(self.path, "opening", exc) from None

        self._conn = await asyncio.to_thread(open_connection)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    # --- reading ------------------------------------------------------------------

    async def read_all(self, spec: TableSpec) -> list[tuple[Any, ...]]:
        sql = f"SELECT {', '.join(spec.names)} FROM {spec.name}"
        return await self._call(f"reading {spec.name}", lambda c: c.execute(sql).fetchall())

    async def batches(
        self, spec: TableSpec, *, after: int | None, size: int
    ) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Raw rows of a large table in key order, after key ``after``."""
        sql = (
            f"SELECT {', '.join(spec.names)} FROM {spec.name}"
            f" WHERE {spec.key} > ? ORDER BY {spec.key} LIMIT ?"
        )
        last = -(2**63) if after is None else after
        index = spec.key_index
        while True:
            rows = await self._call(
                f"reading {spec.name}",
                lambda c, last=last: c.execute(sql, (last, size)).fetchall(),  # type: ignore[misc]
            )
            if not rows:
                return
            yield rows
            last = rows[-1][index]
            if len(rows) < size:
                return

    async def keys(self, spec: TableSpec, upto: int | None = None) -> list[int]:
        """Keys of a large table (at most ``upto``), ascending."""
        sql = f"SELECT {spec.key} FROM {spec.name}"
        params: tuple[Any, ...] = ()
        if upto is not None:
            sql += f" WHERE {spec.key} <= ?"
            params = (upto,)
        sql += f" ORDER BY {spec.key}"
        return await self._call(
            f"reading {spec.name} keys", lambda c: [r[0] for r in c.execute(sql, params)]
        )

    async def fetch(self, spec: TableSpec, keys: Sequence[int]) -> list[tuple[Any, ...]]:
        """Raw rows of a large table by key, in key order."""
        out: list[tuple[Any, ...]] = []
        for i in range(0, len(keys), 500):
            part = list(keys[i : i + 500])
            sql = (
                f"SELECT {', '.join(spec.names)} FROM {spec.name}"
                f" WHERE {spec.key} IN ({', '.join('?' * len(part))}) ORDER BY {spec.key}"
            )
            out += await self._call(
                f"reading {spec.name}",
                lambda c, sql=sql, part=part: c.execute(sql, part).fetchall(),  # type: ignore[misc]
            )
        return out

    async def max_key(self, spec: TableSpec) -> int | None:
        sql = f"SELECT max({spec.key}) FROM {spec.name}"
        value = await self._call(f"reading {spec.name}", lambda c: c.execute(sql).fetchone()[0])
        return None if value is None else int(value)

    async def count(self, spec: TableSpec) -> int:
        sql = f"SELECT count(*) FROM {spec.name}"
        return int(
            await self._call(f"counting {spec.name}", lambda c: c.execute(sql).fetchone()[0])
        )

    async def sequence_marks(self) -> dict[str, int]:
        """The AUTOINCREMENT high-water marks (ids never handed out twice)."""

        def read(c: sqlite3.Connection) -> dict[str, int]:
            rows = c.execute("SELECT name, seq FROM sqlite_sequence").fetchall()
            return {
                bytes(r[0]).decode(): int(r[1]) for r in rows if bytes(r[0]).decode() in SEQUENCED
            }

        return await self._call("reading sqlite_sequence", read)

    # --- writing ------------------------------------------------------------------

    async def insert(self, spec: TableSpec, rows: Sequence[Row]) -> list[tuple[Row, str]]:
        """Insert canonical rows in one transaction; return the rows refused, with reasons."""

        def write(c: sqlite3.Connection) -> list[tuple[Row, str]]:
            c.execute("BEGIN IMMEDIATE")
            failed = insert_rows(c, spec, rows)
            c.execute("COMMIT")
            return failed

        return await self._call(f"writing {spec.name}", write)

    async def set_meta(self, key: str, value: str) -> None:
        await self._call(
            "writing kotonoha_meta",
            lambda c: c.execute(
                "INSERT INTO kotonoha_meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            ),
        )

    async def delete_meta(self, key: str) -> None:
        await self._call(
            "writing kotonoha_meta",
            lambda c: c.execute("DELETE FROM kotonoha_meta WHERE key = ?", (key,)),
        )

    async def fix_message_counts(self) -> int:
        """Make every session's message_count the number of its messages; return changed."""
        sql = (
            "UPDATE sessions SET message_count = (SELECT count(*) FROM messages m"
            " WHERE m.session_key = sessions.session_key) WHERE message_count <>"
            " (SELECT count(*) FROM messages m WHERE m.session_key = sessions.session_key)"
        )
        return int(await self._call("updating message counts", lambda c: c.execute(sql).rowcount))

    async def set_sequences(self, marks: dict[str, int]) -> None:
        """Never hand out an id the source already used (ids stay unique after the move)."""

        def write(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            for table in SEQUENCED:
                high = max(
                    marks.get(table, 0),
                    int(c.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]),
                )
                if high == 0:
                    continue
                cur = c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (high, table))
                if cur.rowcount == 0:
                    c.execute(
                        "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, high)
                    )
            c.execute("COMMIT")

        await self._call("advancing id sequences", write)

    async def wipe(self) -> None:
        """Delete every row (children first) and reset the id sequences."""

        def write(c: sqlite3.Connection) -> None:
            present = {
                bytes(r[0]).decode()
                for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            c.execute("BEGIN IMMEDIATE")
            for spec in reversed(TABLES):
                c.execute(f"DELETE FROM {spec.name}")
            for name in TRANSIENT_TABLES:
                if name in present:
                    c.execute(f"DELETE FROM {name}")
            c.execute("DELETE FROM sqlite_sequence")
            c.execute("COMMIT")

        await self._call("wiping", write)

    async def analyze(self) -> None:
        """Refresh the planner's statistics after a bulk load."""
        await self._call("analysing", lambda c: c.execute("PRAGMA optimize"))

    async def integrity(self) -> dict[str, int]:
        """Rows that point nowhere or disagree with their parent (all 0 when sound)."""
        checks = INTEGRITY_CHECKS

        def read(c: sqlite3.Connection) -> dict[str, int]:
            return {name: int(c.execute(sql).fetchone()[0]) for name, sql in checks.items()}

        return await self._call("checking references", read)
