"""Move a whole database between SQLite and PostgreSQL, and prove the copy is exact.

``migrate`` copies every table (sessions, messages, knowledge sources and chunks with
bit-exact float32 embeddings, kotonoha_meta with the recorded embedding model, and a
running re-embedding's staged vectors) from a source to an empty target:

1. The source is checked (``PRAGMA integrity_check`` for SQLite) before the target is
   even opened, then a SQLite source is copied with the online backup API (a running
   bot's WAL included) and the migration reads that snapshot. A legacy database (the
   pre-ADR-0007 ``sessions`` table) is first converted into a temporary current file.
2. Every row passes :class:`~kotonoha_bot.db.rowconv.RowConverter`: moved faithfully
   (the NUL rule and the documented conversions applied and counted) or written to
   the quarantine file with its table, key and reason. Nothing is dropped silently.
3. The target gets the marker ``migration_in_progress`` in kotonoha_meta before any row,
   rows go in key-ordered batches (one transaction each; COPY on PostgreSQL), then
   message counts and id sequences are fixed up, the vector index is rebuilt, and
   :func:`compare` verifies the target against the source. Only a clean verification
   removes the marker.
4. A rerun after a crash (kill -9, lost connection, full disk) resumes: it skips the
   keys the target holds and continues after the highest one. ``restart=True`` wipes
   the partial copy instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kotonoha_bot.db import DatabaseURL, open_database, parse_database_url, sqlite_path_from_url
from kotonoha_bot.db.rowconv import (
    CHUNK_MESSAGES,
    CHUNKS,
    EMBEDDING_KEYS,
    MEMORIES,
    MESSAGE_REFS,
    MESSAGES,
    META,
    MIGRATION_MARKER,
    PARENTS,
    REEMBED,
    SESSIONS,
    SOURCES,
    TABLES,
    UNMOVED_META_KEYS,
    USAGE,
    Reject,
    Row,
    RowConverter,
    TableSpec,
    comparable,
    jsonable,
    row_digest,
)
from kotonoha_bot.errors import (
    ConfigError,
    CorruptDatabaseError,
    KotonohaError,
    MigrationError,
)
from kotonoha_bot.models import EmbeddingConfig

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.db.postgres import PostgreSQLDatabase
    from kotonoha_bot.db.sqlite_legacy import LegacyReport

T = TypeVar("T")

#: Rows per batch (and per transaction) when copying.
DEFAULT_BATCH = 2000
#: Differing keys listed per table by verify.
DEFAULT_MAX_DIFFS = 10
#: Exit code of `db migrate` when it finished but quarantined rows.
EXIT_QUARANTINED = 3
#: Tables read whole (small) and tables copied in key-ordered batches, in copy order.
SMALL_TABLES = tuple(t for t in TABLES if not t.large)
LARGE_TABLES = tuple(t for t in TABLES if t.large)


# --- small helpers ---------------------------------------------------------------------


def resolve_timezone(name: str | None) -> tuple[tzinfo, str]:
    """The zone naive legacy times are read in: ``name`` (IANA), else the host's."""
    if name:
        try:
            return ZoneInfo(name), name
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"unknown time zone {name!r}: use an IANA name such as Asia/Tokyo or UTC"
            ) from None
    env = os.environ.get("TZ", "").lstrip(":")
    candidates = [env] if env else []
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    with contextlib.suppress(OSError):
        target = os.readlink("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    for candidate in candidates:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(candidate), candidate
    local = datetime.now().astimezone().tzinfo or UTC
    return local, f"host offset {datetime.now().astimezone().strftime('%z')}"


def timestamped(directory: Path, label: str, suffix: str) -> Path:
    """``directory/label-YYYYmmdd-HHMMSS-ffffff{suffix}`` (names sort by time)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    return directory / f"{label}-{stamp}{suffix}"


def _identity(url: str) -> str:
    """A stable name for a database, safe to store and print (no password)."""
    return DatabaseURL.parse(url).identity


def display_url(url: str) -> str:
    """A URL fit for printing (no password)."""
    return DatabaseURL.parse(url).display()


def _small_pool(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "database_pool_min_size": 1,
            "database_pool_max_size": 2,
            "database_read_url": None,
            "database_command_timeout": max(settings.database_command_timeout, 3600.0),
        }
    )


class Quarantine:
    """Rows that could not be moved: JSON lines ``{table, key, reason, row}``.

    The file is created on the first row only; ``path=None`` keeps samples in memory
    (dry runs).
    """

    def __init__(self, path: Path | None, *, samples: int = 20) -> None:
        self.path = path
        self.count = 0
        self.by_table: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self._max_samples = samples
        self._file: Any = None

    def add(self, table: str, key: Any, reason: str, row: dict[str, Any]) -> None:
        self.count += 1
        self.by_table[table] += 1
        entry = {"table": table, "key": jsonable(key), "reason": reason, "row": row}
        if len(self.samples) < self._max_samples:
            self.samples.append(entry)
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Quarantined rows are conversations: readable by their owner only.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        try:
            line = json.dumps(entry, ensure_ascii=False, default=str)
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(entry, ensure_ascii=True, default=str)
        self._file.write(line + "\n")
        self._file.flush()

    def add_row(self, spec: TableSpec, raw: Sequence[Any], reason: str) -> None:
        self.add(
            spec.name,
            raw[spec.key_index],
            reason,
            {n: jsonable(v) for n, v in zip(spec.names, raw, strict=True)},
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


class TransferProgress:
    """Progress callbacks (the CLI draws rich bars; the library default is silent)."""

    def begin(self, task: str, total: int | None) -> None:
        """A step starts (``total`` rows, None when unknown)."""

    def advance(self, task: str, rows: int) -> None:
        """``rows`` more rows done."""

    def end(self, task: str) -> None:
        """The step is done."""

    def note(self, message: str) -> None:
        """A one-line status message."""


class RowStore(Protocol):
    """Raw row access to one database (db/sqlite_rows.py, db/postgres_rows.py)."""

    kind: str

    @property
    def location(self) -> str: ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def read_all(self, spec: TableSpec) -> list[tuple[Any, ...]]: ...
    def batches(
        self, spec: TableSpec, *, after: int | None, size: int
    ) -> AsyncIterator[list[tuple[Any, ...]]]: ...
    async def keys(self, spec: TableSpec, upto: int | None = None) -> list[int]: ...
    async def fetch(self, spec: TableSpec, keys: Sequence[int]) -> list[tuple[Any, ...]]: ...
    async def max_key(self, spec: TableSpec) -> int | None: ...
    async def count(self, spec: TableSpec) -> int: ...
    async def sequence_marks(self) -> dict[str, int]: ...
    async def insert(self, spec: TableSpec, rows: Sequence[Row]) -> list[tuple[Row, str]]: ...
    async def set_meta(self, key: str, value: str) -> None: ...
    async def delete_meta(self, key: str) -> None: ...
    async def fix_message_counts(self) -> int: ...
    async def set_sequences(self, marks: dict[str, int]) -> None: ...
    async def wipe(self) -> None: ...
    async def analyze(self) -> None: ...
    async def integrity(self) -> dict[str, int]: ...


class VerificationFailedError(MigrationError):
    """The copy finished but the target differs from the source; ``report`` says how."""

    def __init__(self, message: str, report: MigrationReport) -> None:
        super().__init__(message)
        self.report = report


# --- reports ---------------------------------------------------------------------------


@dataclass
class TableReport:
    """One table's part of a migration."""

    table: str
    source_rows: int = 0
    moved: int = 0
    already_present: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    #: For a legacy source: rows (or messages) in the legacy file, before conversion.
    legacy_rows: int | None = None


@dataclass
class TableDiff:
    """How one table of the target compares with the (converted) source."""

    table: str
    expected_rows: int = 0
    target_rows: int = 0
    matching: int = 0
    missing_count: int = 0
    extra_count: int = 0
    differing_count: int = 0
    invalid_count: int = 0
    source_quarantined: int = 0
    vectors_compared: int = 0
    missing: list[Any] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)
    differing: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    expected_checksum: str = ""
    target_checksum: str = ""

    @property
    def identical(self) -> bool:
        return not (self.missing_count or self.extra_count or self.differing_count) and not (
            self.invalid_count
        )


@dataclass
class VerifyReport:
    """The outcome of :func:`compare`: identical only when every check passed."""

    source: str
    target: str
    tables: dict[str, TableDiff]
    integrity: dict[str, int]
    marker: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return (
            all(t.identical for t in self.tables.values())
            and not any(self.integrity.values())
            and self.marker is None
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["identical"] = self.identical
        return out


@dataclass
class MigrationReport:
    """What a migration (or a dry run) did."""

    source: str
    target: str
    source_kind: str
    dry_run: bool
    mode: str = "fresh"  # fresh | resume | restart
    timezone: str = ""
    backup_path: Path | None = None
    quarantine_path: Path | None = None
    tables: dict[str, TableReport] = field(default_factory=dict)
    conversions: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0
    quarantine_samples: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    message_counts_fixed: int = 0
    embedding: EmbeddingConfig | None = None
    verify: VerifyReport | None = None
    seconds: float = 0.0
    legacy: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINED if self.quarantined else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # (asdict rebuilds a Counter from its items, which would count the pairs.)
        out["conversions"] = dict(self.conversions)
        out["verify"] = self.verify.as_dict() if self.verify else None
        out["exit_code"] = self.exit_code
        for key in ("backup_path", "quarantine_path"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out


# --- opening the two ends --------------------------------------------------------------


@dataclass
class _Source:
    store: RowStore
    kind: str  # sqlite | legacy | postgresql
    identity: str


@dataclass
class _TargetInfo:
    kind: str  # missing | empty | current | legacy | unknown | postgresql
    has_schema: bool
    counts: dict[str, int]
    meta: dict[str, str]
    schema_version: int = 0
    server_version_num: int = 0

    @property
    def data_rows(self) -> int:
        return sum(n for t, n in self.counts.items() if t != META.name)


@contextlib.asynccontextmanager
async def _open_source(
    url: str,
    settings: Settings,
    *,
    timezone: tzinfo,
    backup_dir: Path | None,
    quarantine: Quarantine,
    report: MigrationReport | None,
    progress: TransferProgress,
) -> AsyncIterator[_Source]:
    """Check the source, back it up, convert a legacy file; yield a snapshot reader."""
    identity = _identity(url)
    if parse_database_url(url) != "sqlite":
        async with _open_pg_reader(url, settings, "source") as store:
            yield _Source(store, "postgresql", identity)
        return

    from kotonoha_bot.db.sqlite import LATEST_SCHEMA_VERSION
    from kotonoha_bot.db.sqlite_rows import (
        SQLiteRows,
        check_columns,
        check_schema_version,
        inspect_file,
        integrity_check,
        online_backup,
    )

    path = sqlite_path_from_url(url)
    if not path.is_file():
        raise MigrationError(f"source {path} does not exist")
    try:
        progress.note(f"checking {path} (PRAGMA integrity_check)")
        await asyncio.to_thread(integrity_check, path)
        info = await asyncio.to_thread(inspect_file, path)
    except CorruptDatabaseError as exc:
        raise MigrationError(f"{exc}; nothing was written (the target was not opened)") from None
    if info.kind in ("empty", "unknown"):
        tables = ", ".join(info.tables) or "none"
        raise MigrationError(f"source {path} is not a kotonoha database (tables: {tables})")
    older = False
    if info.kind == "current":
        check_schema_version(path, info.schema_version)
        older = info.schema_version < LATEST_SCHEMA_VERSION
        if not older:
            await asyncio.to_thread(check_columns, path)
        if MIGRATION_MARKER in info.meta:
            raise MigrationError(
                f"source {path} is itself an unfinished migration target"
                f" ({MIGRATION_MARKER} is set); finish that migration first"
            )
    if report is not None and info.unknown_tables:
        report.warnings.append(
            "not moved (unknown tables): " + ", ".join(t for t in info.unknown_tables)
        )
    read_path = path
    if backup_dir is not None:
        from kotonoha_bot.db.backup import rotate

        # Named after this database (label has a hash of its identity) and rotated like
        # the regular backups, so reruns cannot fill the disk with safety copies.
        label = f"{DatabaseURL.parse(url).label}-premigrate"
        dest = timestamped(backup_dir, label, ".db")
        progress.note(f"backing up {path} -> {dest}")
        await asyncio.to_thread(online_backup, path, dest)
        rotate(backup_dir, label, settings.backup_keep)
        if report is not None:
            report.backup_path = dest.resolve()
        read_path = dest
    with tempfile.TemporaryDirectory(prefix="kotonoha-legacy-") as tmp:
        kind = "sqlite"
        if older:
            # An older schema is upgraded on a private copy (the source and its backup
            # stay as they are): the migrations fill in what the new columns hold.
            upgraded = Path(tmp) / "upgraded.db"
            progress.note(f"upgrading a copy of {path} from schema {info.schema_version}")
            await asyncio.to_thread(online_backup, read_path, upgraded)
            async with open_database(f"sqlite:///{upgraded}", settings=settings):
                pass
            await asyncio.to_thread(check_columns, upgraded)
            read_path = upgraded
        if info.kind == "legacy":
            kind = "legacy"
            read_path = await _convert_legacy(
                read_path,
                Path(tmp) / "converted.db",
                timezone,
                quarantine,
                report,
                progress,
                total=info.counts.get("sessions"),
            )
        store = SQLiteRows(read_path, readonly=True)
        await store.open()
        try:
            yield _Source(store, kind, identity)
        finally:
            await store.close()


async def _convert_legacy(
    legacy: Path,
    out: Path,
    timezone: tzinfo,
    quarantine: Quarantine,
    report: MigrationReport | None,
    progress: TransferProgress,
    total: int | None,
) -> Path:
    from kotonoha_bot.db.sqlite_legacy import legacy_to_file

    progress.begin("convert legacy sessions", total)
    result = await asyncio.to_thread(
        legacy_to_file,
        legacy,
        out,
        timezone=timezone,
        quarantine=quarantine.add,
        on_session=lambda: progress.advance("convert legacy sessions", 1),
    )
    progress.end("convert legacy sessions")
    if report is not None:
        report.legacy = _legacy_summary(result)
        report.conversions.update(result.stats)
        # Rows set aside while converting count against their tables like any other.
        for spec, read, bad in (
            (SESSIONS, result.sessions_read, result.quarantined_sessions),
            (MESSAGES, result.messages + result.quarantined_messages, result.quarantined_messages),
        ):
            rep = report.tables.setdefault(spec.name, TableReport(spec.name))
            rep.quarantined += bad
            rep.legacy_rows = read
        if result.ignored_fields:
            report.warnings.append(
                "legacy message fields not moved: "
                + ", ".join(f"{k} ({n}x)" for k, n in sorted(result.ignored_fields.items()))
            )
        if result.ignored_columns:
            report.warnings.append("legacy columns not moved: " + ", ".join(result.ignored_columns))
    return out


def _legacy_summary(result: LegacyReport) -> dict[str, Any]:
    return {
        "sessions_read": result.sessions_read,
        "sessions": result.sessions,
        "messages": result.messages,
        "quarantined_sessions": result.quarantined_sessions,
        "quarantined_messages": result.quarantined_messages,
    }


@contextlib.asynccontextmanager
async def _open_pg_reader(url: str, settings: Settings, role: str) -> AsyncIterator[RowStore]:
    from kotonoha_bot.db.postgres_rows import PostgresRows, inspect_database

    db: Any = open_database(url, settings=_small_pool(settings))
    info = await inspect_database(db)
    if not info.has_schema:
        raise MigrationError(f"{role} {db.location} holds no kotonoha database")
    if role == "source" and MIGRATION_MARKER in info.meta:
        raise MigrationError(
            f"source {db.location} is itself an unfinished migration target"
            f" ({MIGRATION_MARKER} is set); finish that migration first"
        )
    async with db:
        store = PostgresRows(db, snapshot=True)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


async def _inspect_target(url: str, settings: Settings) -> _TargetInfo:
    """What the target holds, read without creating or migrating anything."""
    if parse_database_url(url) == "sqlite":
        from kotonoha_bot.db.sqlite_rows import inspect_file

        info = await asyncio.to_thread(inspect_file, sqlite_path_from_url(url))
        return _TargetInfo(
            info.kind, info.kind == "current", info.counts, info.meta, info.schema_version
        )
    from kotonoha_bot.db.postgres_rows import inspect_database

    db = cast("PostgreSQLDatabase", open_database(url, settings=_small_pool(settings)))
    pg = await inspect_database(db)
    return _TargetInfo(
        "postgresql", pg.has_schema, pg.counts, pg.meta, pg.schema_version, pg.server_version_num
    )


def _plan(info: _TargetInfo, target: str, identity: str, restart: bool) -> str:
    """fresh, resume or restart; refuse anything else with the reason."""
    if info.kind in ("legacy", "unknown"):
        raise MigrationError(
            f"target {target} is not an empty kotonoha database ({info.kind} file);"
            " choose a new file or an empty database"
        )
    marker_text = info.meta.get(MIGRATION_MARKER)
    if marker_text is not None:
        try:
            marker = json.loads(marker_text)
            previous = str(marker.get("source", "?"))
        except (ValueError, AttributeError):
            previous = "?"
        if restart:
            return "restart"
        if previous != identity:
            raise MigrationError(
                f"target {target} holds an unfinished migration from {previous}, not from"
                f" {identity}; rerun with that source to resume, or with --restart to wipe"
                " the partial copy and start over"
            )
        return "resume"
    if restart:
        raise MigrationError(
            f"--restart only wipes an unfinished migration, and {target} holds none"
        )
    if info.data_rows:
        counts = ", ".join(f"{n} {t}" for t, n in info.counts.items() if n and t != META.name)
        raise MigrationError(
            f"target {target} is not empty ({counts}); migrate into an empty database"
            " (or restore a backup with `kotonoha db restore --wipe`)"
        )
    return "fresh"


def check_target_can_index(target_url: str, embedding: EmbeddingConfig | None) -> None:
    """pgvector indexes at most 4000 dimensions: say so before anything is written."""
    from kotonoha_bot.db.pg_schema import HALFVEC_INDEX_MAX_DIM

    if (
        embedding is not None
        and parse_database_url(target_url) != "sqlite"
        and embedding.dimension > HALFVEC_INDEX_MAX_DIM
    ):
        raise MigrationError(
            f"the source's embedding model {embedding.model!r} has {embedding.dimension}"
            f" dimensions; pgvector indexes at most {HALFVEC_INDEX_MAX_DIM}. Re-embed with a"
            " smaller model first (`kotonoha kb reembed`), or stay on SQLite"
        )


def _check_target_meta(info: _TargetInfo, source_meta: dict[str, str], target: str) -> None:
    """A fresh target may only hold meta rows that equal the source's."""
    if MIGRATION_MARKER in info.meta:
        return
    for key, value in info.meta.items():
        if key not in UNMOVED_META_KEYS and source_meta.get(key) != value:
            raise MigrationError(
                f"target {target} is not empty: kotonoha_meta {key!r} = {value!r} differs"
                f" from the source ({source_meta.get(key)!r})"
            )


# --- the copy --------------------------------------------------------------------------


def _embedding_from_meta(meta: dict[str, str], prefix: str) -> EmbeddingConfig | None:
    model = meta.get(f"{prefix}_model")
    dim = meta.get(f"{prefix}_dimension")
    if model is None or dim is None:
        return None
    try:
        return EmbeddingConfig(model, int(dim))
    except ValueError:
        raise MigrationError(
            f"source kotonoha_meta {prefix}_dimension {dim!r} is not a number"
        ) from None


class _Copier:
    """One migration's state: the converter, the quarantine, the per-table reports."""

    def __init__(
        self,
        source: _Source,
        report: MigrationReport,
        quarantine: Quarantine,
        timezone: tzinfo,
        batch: int,
        progress: TransferProgress,
    ) -> None:
        self.source = source
        self.report = report
        self.quarantine = quarantine
        self.timezone = timezone
        self.batch = batch
        self.progress = progress
        self.conv = RowConverter(timezone=timezone)
        self.small: dict[str, list[Row]] = {}
        self.meta: dict[str, str] = {}
        self.embedding: EmbeddingConfig | None = None

    def _table(self, spec: TableSpec) -> TableReport:
        return self.report.tables.setdefault(spec.name, TableReport(spec.name))

    def _convert(self, spec: TableSpec, raws: Sequence[tuple[Any, ...]]) -> list[Row]:
        out: list[Row] = []
        rep = self._table(spec)
        for raw in raws:
            try:
                out.append(self.conv.convert(spec, raw))
            except Reject as exc:
                rep.quarantined += 1
                self.quarantine.add_row(spec, raw, str(exc))
        return out

    async def prepare(self) -> None:
        """Read and convert the small tables and the vector sizes (nothing is written)."""
        store = self.source.store
        raw_meta = await store.read_all(META)
        # The converter needs the vector sizes before the meta rows themselves.
        plain = {
            bytes(r[0]).decode("utf-8", "replace") if isinstance(r[0], bytes) else str(r[0]): (
                bytes(r[1]).decode("utf-8", "replace") if isinstance(r[1], bytes) else str(r[1])
            )
            for r in raw_meta
            if r[0] is not None and r[1] is not None
        }
        self.embedding = _embedding_from_meta(plain, "embedding")
        reembed = _embedding_from_meta(plain, "reembed")
        self.conv.embedding_dim = self.embedding.dimension if self.embedding else None
        self.conv.reembed_dim = reembed.dimension if reembed else None
        self.report.embedding = self.embedding
        for spec in SMALL_TABLES:
            raws = raw_meta if spec is META else await store.read_all(spec)
            rows = self._convert(spec, raws)
            if spec is META:
                rows = [r for r in rows if r[0] not in UNMOVED_META_KEYS]
                self.meta = {r[0]: r[1] for r in rows}
            self.small[spec.name] = rows
            self._table(spec).source_rows = len(raws)

    async def dry_run(self) -> None:
        """Convert the large tables too, counting what would move."""
        store = self.source.store
        seen: dict[str, set[int]] = {MESSAGES.name: set(), CHUNKS.name: set()}
        self.conv.chunk_exists = seen[CHUNKS.name].__contains__
        self.conv.message_exists = seen[MESSAGES.name].__contains__
        for spec in LARGE_TABLES:
            rep = self._table(spec)
            self.progress.begin(f"scan {spec.name}", await store.count(spec))
            async for raws in store.batches(spec, after=None, size=self.batch):
                rows = self._convert(spec, raws)
                rep.source_rows += len(raws)
                rep.moved += len(rows)
                if spec.name in seen:
                    seen[spec.name].update(r[0] for r in rows)
                self.progress.advance(f"scan {spec.name}", len(raws))
            self.progress.end(f"scan {spec.name}")
        for spec in SMALL_TABLES:
            self._table(spec).moved = len(self.small[spec.name])

    async def check_resumable(self, target: RowStore) -> None:
        """Before writing: the target may only hold rows of this source."""
        for spec in SMALL_TABLES:
            if spec is META:
                continue
            have = {_key_text(r[spec.key_index]) for r in await target.read_all(spec)}
            mine = {r[spec.key_index] for r in self.small[spec.name]}
            extra = have - mine
            if extra:
                raise MigrationError(
                    f"target {target.location} holds {len(extra)} {spec.name} rows that the"
                    f" source lacks (e.g. {sorted(map(str, extra))[0]!r}); it is not a partial"
                    " copy of this source: rerun with --restart to wipe it"
                )
        for spec in LARGE_TABLES:
            high = await target.max_key(spec)
            if high is None:
                continue
            have = set(await target.keys(spec))
            mine = set(await self.source.store.keys(spec, upto=high))
            extra = have - mine
            if extra:
                raise MigrationError(
                    f"target {target.location} holds {len(extra)} {spec.name} rows that the"
                    f" source lacks (e.g. id {min(extra)}); it is not a partial copy of this"
                    " source: rerun with --restart to wipe it"
                )

    async def copy(self, target: RowStore) -> None:
        """Insert everything the target lacks, table by table, in key order."""
        for spec in TABLES:
            started = time.perf_counter()
            if spec.large:
                await self._copy_large(spec, target)
            else:
                await self._copy_small(spec, target)
            self._table(spec).seconds += time.perf_counter() - started

    async def _insert(self, spec: TableSpec, target: RowStore, rows: list[Row]) -> None:
        if not rows:
            return
        failed = await target.insert(spec, rows)
        rep = self._table(spec)
        rep.moved += len(rows) - len(failed)
        for row, reason in failed:
            rep.quarantined += 1
            self.quarantine.add(
                spec.name,
                row[spec.key_index],
                reason,
                {n: jsonable(v) for n, v in zip(spec.names, row, strict=True)},
            )
            if spec is MESSAGES:
                self.conv.forget_message(row[1])
        self.progress.advance(spec.name, len(rows))

    async def _copy_small(self, spec: TableSpec, target: RowStore) -> None:
        rows = self.small[spec.name]
        rep = self._table(spec)
        if spec is META:
            # The embedding model is recorded through the contract (it types the vector
            # column on PostgreSQL); the other keys are copied as they are.
            recorded = [r for r in rows if r[0] in EMBEDDING_KEYS]
            rows = [r for r in rows if r[0] not in EMBEDDING_KEYS]
            if self.report.mode == "resume":
                rep.already_present += len(recorded)
            else:
                rep.moved += len(recorded)
        present = {_key_text(r[spec.key_index]) for r in await target.read_all(spec)}
        todo = [r for r in rows if _key_text(r[spec.key_index]) not in present]
        rep.already_present += len(rows) - len(todo)
        self.progress.begin(spec.name, len(rows))
        self.progress.advance(spec.name, len(rows) - len(todo))
        for i in range(0, len(todo), self.batch):
            await self._insert(spec, target, todo[i : i + self.batch])
        self.progress.end(spec.name)

    async def _copy_large(self, spec: TableSpec, target: RowStore) -> None:
        store = self.source.store
        rep = self._table(spec)
        total = await store.count(spec)
        rep.source_rows = total
        self.progress.begin(spec.name, total)
        if total and spec.name in PARENTS:
            # A child row is moved only if its parent is in the target (moved now or
            # by an earlier run); the others are quarantined with the reason.
            parents = PARENTS[spec.name]
            if CHUNKS.name in parents:
                moved_chunks = set(await target.keys(CHUNKS))
                self.conv.chunk_exists = moved_chunks.__contains__
            if MESSAGES.name in parents:
                moved_messages = set(await target.keys(MESSAGES))
                self.conv.message_exists = moved_messages.__contains__
        high = await target.max_key(spec)
        if high is not None:
            # Resuming: rows up to the target's highest key were handled by an earlier
            # run; only those it lacks (quarantined then, or refused) are looked at again.
            have = set(await target.keys(spec))
            before = await store.keys(spec, upto=high)
            missing = [k for k in before if k not in have]
            rep.already_present += len(have)
            self.progress.advance(spec.name, len(before) - len(missing))
            for i in range(0, len(missing), self.batch):
                part = missing[i : i + self.batch]
                raws = await store.fetch(spec, part)
                rows = self._convert(spec, raws)
                self.progress.advance(spec.name, len(raws) - len(rows))
                await self._insert(spec, target, rows)
        async for raws in _prefetch(store.batches(spec, after=high, size=self.batch)):
            rows = self._convert(spec, raws)
            self.progress.advance(spec.name, len(raws) - len(rows))
            await self._insert(spec, target, rows)
        self.progress.end(spec.name)


async def _prefetch(batches: AsyncIterator[T]) -> AsyncIterator[T]:
    """Fetch the next batch while the caller works on this one (I/O overlaps CPU)."""
    pending: asyncio.Future[T | None] = asyncio.ensure_future(anext(batches, None))
    try:
        while True:
            item = await pending
            if item is None:
                return
            pending = asyncio.ensure_future(anext(batches, None))
            yield item
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, KotonohaError):
                await pending


def _key_text(key: Any) -> Any:
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    return key


@contextlib.asynccontextmanager
async def _open_target(
    url: str, settings: Settings, embedding: EmbeddingConfig | None, marker: str, mode: str
) -> AsyncIterator[tuple[RowStore, Any]]:
    """Create the schema, set the marker first, record the embedding model; yield a writer.

    The second value is the open contract object on PostgreSQL (for the index rebuild),
    None on SQLite.
    """
    if parse_database_url(url) == "sqlite":
        from kotonoha_bot.db.sqlite_rows import SQLiteRows

        path = sqlite_path_from_url(url)
        async with open_database(url, settings=settings):
            pass  # creates the file and its schema
        writer = SQLiteRows(path, readonly=False)
        await writer.open()
        try:
            await writer.set_meta(MIGRATION_MARKER, marker)
            if mode == "restart":
                await writer.wipe()
                await writer.set_meta(MIGRATION_MARKER, marker)
            if embedding is not None:
                async with open_database(url, settings=settings) as db:
                    await db.set_embedding_config(embedding)
            yield writer, None
        finally:
            await writer.close()
        return

    from kotonoha_bot.db.postgres_rows import PostgresRows

    async with open_database(url, settings=_small_pool(settings)) as opened:
        pg = cast("PostgreSQLDatabase", opened)
        pg_writer = PostgresRows(pg, snapshot=False)
        await pg_writer.open()
        try:
            await pg_writer.set_meta(MIGRATION_MARKER, marker)
            if mode == "restart":
                await pg_writer.wipe()
                await pg_writer.set_meta(MIGRATION_MARKER, marker)
            if embedding is not None:
                await pg.set_embedding_config(embedding)
            # Loading without the ANN index and building it once is far faster.
            await pg_writer.drop_vector_index()
            yield pg_writer, pg
        finally:
            await pg_writer.close()


async def migrate(
    source_url: str,
    target_url: str,
    *,
    settings: Settings,
    dry_run: bool = False,
    restart: bool = False,
    source_timezone: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    backup_dir: Path | None = None,
    backup_source: bool = True,
    quarantine_path: Path | None = None,
    progress: TransferProgress | None = None,
    max_diffs: int = DEFAULT_MAX_DIFFS,
) -> MigrationReport:
    """Copy every row of ``source_url`` into the empty ``target_url``, then verify.

    Raises :class:`MigrationError` (saying what state the target is in) when it cannot
    finish, including when verification finds a difference (the marker then stays).
    """
    started = time.perf_counter()
    progress = progress or TransferProgress()
    if batch_size < 1:
        raise ConfigError("batch size must be at least 1")
    parse_database_url(target_url)
    identity = _identity(source_url)
    target_name = _identity(target_url)
    if identity == target_name:
        raise ConfigError("source and target are the same database")
    timezone, tz_label = resolve_timezone(source_timezone)
    report = MigrationReport(
        source=display_url(source_url),
        target=display_url(target_url),
        source_kind="?",
        dry_run=dry_run,
        timezone=tz_label,
    )
    backups = None if dry_run or not backup_source else (backup_dir or settings.backup_dir)
    if quarantine_path is None and not dry_run:
        quarantine_path = timestamped(
            backup_dir or settings.backup_dir, "kotonoha-quarantine", ".jsonl"
        )
    quarantine = Quarantine(None if dry_run else quarantine_path)
    try:
        async with _open_source(
            source_url,
            settings,
            timezone=timezone,
            backup_dir=backups,
            quarantine=quarantine,
            report=report,
            progress=progress,
        ) as source:
            report.source_kind = source.kind
            copier = _Copier(source, report, quarantine, timezone, batch_size, progress)
            await copier.prepare()
            info = await _inspect_target(target_url, settings)
            try:
                report.mode = _plan(info, report.target, identity, restart)
                if report.mode == "fresh":
                    _check_target_meta(info, copier.meta, report.target)
                check_target_can_index(target_url, copier.embedding)
            except MigrationError as exc:
                if not dry_run:
                    raise
                report.mode = "refuse"
                report.warnings.append(str(exc))
            try:
                if dry_run:
                    await copier.dry_run()
                else:
                    await _run(copier, source, target_url, settings, report, progress, max_diffs)
            finally:
                report.tables = {
                    t.name: report.tables[t.name] for t in TABLES if t.name in report.tables
                }
                report.conversions.update(copier.conv.stats)
                report.quarantined = quarantine.count
                report.quarantine_samples = quarantine.samples
                if quarantine.count and quarantine_path is not None:
                    report.quarantine_path = quarantine_path.resolve()
                report.seconds = time.perf_counter() - started
    finally:
        quarantine.close()
    return report


async def _run(
    copier: _Copier,
    source: _Source,
    target_url: str,
    settings: Settings,
    report: MigrationReport,
    progress: TransferProgress,
    max_diffs: int,
) -> None:
    marker = json.dumps(
        {
            "source": source.identity,
            "source_kind": source.kind,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    try:
        async with _open_target(target_url, settings, copier.embedding, marker, report.mode) as (
            writer,
            pg,
        ):
            if report.mode == "resume":
                await copier.check_resumable(writer)
            await copier.copy(writer)
            progress.note("fixing message counts and id sequences")
            report.message_counts_fixed = await writer.fix_message_counts()
            marks = await source.store.sequence_marks()
            await writer.set_sequences(marks)
            if pg is not None:
                progress.note("building the vector index")
                await pg.rebuild_vector_index()
            await writer.analyze()
            progress.note("verifying")
            report.verify = await compare(
                source.store,
                writer,
                timezone=copier.timezone,
                batch_size=copier.batch,
                max_diffs=max_diffs,
                progress=progress,
                ignore_marker=True,
                source_name=report.source,
                target_name=report.target,
            )
            if report.verify.identical:
                await writer.delete_meta(MIGRATION_MARKER)
    except MigrationError:
        raise
    except KotonohaError as exc:
        raise MigrationError(
            f"{type(exc).__name__}: {exc}. The target holds a partial copy marked"
            f" {MIGRATION_MARKER!r}; fix the cause and rerun the same command to resume"
            " (or add --restart to start over)"
        ) from None
    if not report.verify.identical:
        raise VerificationFailedError(
            f"verification found differences; the target keeps the {MIGRATION_MARKER!r}"
            " marker. Rerun to resume, or add --restart to start over",
            report,
        )


# --- verification ----------------------------------------------------------------------


class _Side:
    """One side of a comparison: its converter and what it saw."""

    def __init__(self, store: RowStore, timezone: tzinfo, dims: tuple[int | None, int | None]):
        self.store = store
        self.conv = RowConverter(timezone=timezone, embedding_dim=dims[0], reembed_dim=dims[1])
        self.chunk_ids: set[int] = set()
        self.message_ids: set[int] = set()
        self.conv.chunk_exists = self.chunk_ids.__contains__
        self.conv.message_exists = self.message_ids.__contains__

    def convert(self, spec: TableSpec, raw: Sequence[Any]) -> tuple[Row | None, str | None]:
        try:
            return self.conv.convert(spec, raw), None
        except Reject as exc:
            return None, str(exc)


async def _dims(store: RowStore) -> tuple[dict[str, str], tuple[int | None, int | None]]:
    meta: dict[str, str] = {}
    for r in await store.read_all(META):
        if r[0] is not None and r[1] is not None:
            meta[str(_key_text(r[0]))] = str(_key_text(r[1]))
    emb = _embedding_from_meta(meta, "embedding")
    ree = _embedding_from_meta(meta, "reembed")
    return meta, (emb.dimension if emb else None, ree.dimension if ree else None)


class _Compare:
    def __init__(self, spec: TableSpec, max_diffs: int) -> None:
        self.spec = spec
        self.diff = TableDiff(spec.name)
        self.max = max_diffs
        self.h_expected = hashlib.blake2b(digest_size=16)
        self.h_target = hashlib.blake2b(digest_size=16)

    def expected_only(self, key: Any) -> None:
        self.diff.missing_count += 1
        if len(self.diff.missing) < self.max:
            self.diff.missing.append(jsonable(key))

    def target_only(self, key: Any) -> None:
        self.diff.extra_count += 1
        if len(self.diff.extra) < self.max:
            self.diff.extra.append(jsonable(key))

    def invalid(self, key: Any, reason: str) -> None:
        self.diff.invalid_count += 1
        if len(self.diff.invalid) < self.max:
            self.diff.invalid.append({"key": jsonable(key), "reason": reason})

    def both(self, key: Any, expected: tuple[Any, ...], actual: tuple[Any, ...]) -> None:
        de, da = row_digest(expected), row_digest(actual)
        self.h_expected.update(repr(key).encode() + de)
        self.h_target.update(repr(key).encode() + da)
        if self.spec.name in (CHUNKS.name, REEMBED.name):
            idx = self.spec.names.index("embedding")
            if expected[idx] is not None and actual[idx] is not None:
                self.diff.vectors_compared += 1
        if de == da:
            self.diff.matching += 1
            return
        self.diff.differing_count += 1
        if len(self.diff.differing) < self.max:
            columns = [
                n for n, a, b in zip(self.spec.names, expected, actual, strict=True) if a != b
            ]
            self.diff.differing.append({"key": jsonable(key), "columns": columns})

    def finish(self) -> TableDiff:
        self.diff.expected_checksum = self.h_expected.hexdigest()
        self.diff.target_checksum = self.h_target.hexdigest()
        return self.diff


async def compare(
    expected: RowStore,
    actual: RowStore,
    *,
    timezone: tzinfo,
    batch_size: int = DEFAULT_BATCH,
    max_diffs: int = DEFAULT_MAX_DIFFS,
    progress: TransferProgress | None = None,
    ignore_marker: bool = False,
    source_name: str = "",
    target_name: str = "",
) -> VerifyReport:
    """Compare every row of ``actual`` with ``expected`` converted by the migration rules.

    Rows the conversion rejects (they would be quarantined) are expected to be absent.
    Rows are compared by checksum in key order, values column by column when they
    differ; embeddings bit for bit.
    """
    started = time.perf_counter()
    progress = progress or TransferProgress()
    _, dims_e = await _dims(expected)
    meta_a, _ = await _dims(actual)
    marker = None
    if MIGRATION_MARKER in meta_a and not ignore_marker:
        try:
            marker = json.loads(meta_a[MIGRATION_MARKER])
        except ValueError:
            marker = {"value": meta_a[MIGRATION_MARKER]}
    # Both sides are read with the source's vector sizes: a target vector of another
    # size is then reported, not silently accepted.
    e, a = _Side(expected, timezone, dims_e), _Side(actual, timezone, dims_e)
    tables: dict[str, TableDiff] = {}

    async def small(spec: TableSpec) -> tuple[dict[Any, Row], dict[Any, Row], _Compare]:
        cmp = _Compare(spec, max_diffs)
        exp: dict[Any, Row] = {}
        act: dict[Any, Row] = {}
        for raw in await expected.read_all(spec):
            row, _ = e.convert(spec, raw)
            if row is None:
                cmp.diff.source_quarantined += 1
            elif not (spec is META and row[0] in UNMOVED_META_KEYS):
                exp[row[spec.key_index]] = row
        for raw in await actual.read_all(spec):
            row, reason = a.convert(spec, raw)
            if row is None:
                cmp.diff.target_rows += 1
                cmp.invalid(_key_text(raw[spec.key_index]), reason or "")
            elif not (spec is META and row[0] in UNMOVED_META_KEYS):
                act[row[spec.key_index]] = row
        cmp.diff.expected_rows = len(exp)
        cmp.diff.target_rows += len(act)
        return exp, act, cmp

    def finish_small(
        spec: TableSpec, exp: dict[Any, Row], act: dict[Any, Row], cmp: _Compare
    ) -> None:
        for key in sorted(exp.keys() | act.keys(), key=lambda k: (str(type(k)), k)):
            if key not in act:
                cmp.expected_only(key)
            elif key not in exp:
                cmp.target_only(key)
            else:
                cmp.both(key, comparable(spec, exp[key]), comparable(spec, act[key]))
        tables[spec.name] = cmp.finish()

    meta = await small(META)
    finish_small(META, *meta)
    sessions = await small(SESSIONS)
    await _compare_large(MESSAGES, e, a, tables, batch_size, max_diffs, progress)
    # A session's message_count is the number of its messages that moved.
    exp_sessions = {
        k: (*r[:8], e.conv.message_counts.get(k, 0), *r[9:]) for k, r in sessions[0].items()
    }
    finish_small(SESSIONS, exp_sessions, sessions[1], sessions[2])
    await _compare_large(MESSAGE_REFS, e, a, tables, batch_size, max_diffs, progress)
    finish_small(SOURCES, *(await small(SOURCES)))
    for spec in (CHUNKS, CHUNK_MESSAGES, REEMBED, MEMORIES, USAGE):
        await _compare_large(spec, e, a, tables, batch_size, max_diffs, progress)
    integrity = await actual.integrity()
    ordered = {t.name: tables[t.name] for t in TABLES}
    return VerifyReport(
        source=source_name or expected.location,
        target=target_name or actual.location,
        tables=ordered,
        integrity=integrity,
        marker=marker,
        seconds=time.perf_counter() - started,
    )


async def _items(
    side: _Side, spec: TableSpec, batch: int, progress: TransferProgress, task: str | None
) -> AsyncIterator[tuple[int, Row | None, str | None, Any]]:
    async for raws in _prefetch(side.store.batches(spec, after=None, size=batch)):
        for raw in raws:
            row, reason = side.convert(spec, raw)
            if row is not None and spec is CHUNKS:
                side.chunk_ids.add(row[0])
            elif row is not None and spec is MESSAGES:
                side.message_ids.add(row[0])
            yield int(raw[spec.key_index]), row, reason, raw
        if task is not None:
            progress.advance(task, len(raws))


async def _compare_large(
    spec: TableSpec,
    e: _Side,
    a: _Side,
    tables: dict[str, TableDiff],
    batch: int,
    max_diffs: int,
    progress: TransferProgress,
) -> None:
    cmp = _Compare(spec, max_diffs)
    task = f"verify {spec.name}"
    progress.begin(task, await e.store.count(spec))
    exp_it = _items(e, spec, batch, progress, task)
    act_it = _items(a, spec, batch, progress, None)
    x = await anext(exp_it, None)
    y = await anext(act_it, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            assert x is not None
            if x[1] is None:
                cmp.diff.source_quarantined += 1
            else:
                cmp.diff.expected_rows += 1
                cmp.expected_only(x[0])
            x = await anext(exp_it, None)
        elif x is None or y[0] < x[0]:
            cmp.diff.target_rows += 1
            if y[1] is None:
                cmp.invalid(y[0], y[2] or "")
            else:
                cmp.target_only(y[0])
            y = await anext(act_it, None)
        else:
            cmp.diff.target_rows += 1
            if x[1] is None:
                cmp.diff.source_quarantined += 1
                cmp.target_only(x[0])
            else:
                cmp.diff.expected_rows += 1
                if y[1] is None:
                    cmp.invalid(y[0], y[2] or "")
                else:
                    cmp.both(x[0], comparable(spec, x[1]), comparable(spec, y[1]))
            x = await anext(exp_it, None)
            y = await anext(act_it, None)
    progress.end(task)
    tables[spec.name] = cmp.finish()


@contextlib.asynccontextmanager
async def _open_reader(url: str, settings: Settings, role: str) -> AsyncIterator[RowStore]:
    """A read-only, snapshot reader on a current-schema database (never migrated)."""
    if parse_database_url(url) != "sqlite":
        async with _open_pg_reader(url, settings, role) as store:
            yield store
        return
    from kotonoha_bot.db.sqlite_rows import SQLiteRows, check_schema_version, inspect_file

    path = sqlite_path_from_url(url)
    info = await asyncio.to_thread(inspect_file, path)
    if info.kind != "current":
        raise MigrationError(f"{role} {path} holds no kotonoha database ({info.kind})")
    check_schema_version(path, info.schema_version)
    store = SQLiteRows(path, readonly=True)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def verify(
    source_url: str,
    target_url: str,
    *,
    settings: Settings,
    source_timezone: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_diffs: int = DEFAULT_MAX_DIFFS,
    progress: TransferProgress | None = None,
) -> VerifyReport:
    """Compare a target with its source (a legacy source is converted first)."""
    progress = progress or TransferProgress()
    timezone, _ = resolve_timezone(source_timezone)
    if _identity(source_url) == _identity(target_url):
        raise ConfigError("source and target are the same database")
    quarantine = Quarantine(None)
    async with (
        _open_source(
            source_url,
            settings,
            timezone=timezone,
            backup_dir=None,
            quarantine=quarantine,
            report=None,
            progress=progress,
        ) as source,
        _open_reader(target_url, settings, "target") as target,
    ):
        report = await compare(
            source.store,
            target,
            timezone=timezone,
            batch_size=batch_size,
            max_diffs=max_diffs,
            progress=progress,
            source_name=display_url(source_url),
            target_name=display_url(target_url),
        )
    if quarantine.count:
        # Legacy rows the conversion sets aside are expected to be absent, like the
        # quarantined rows of a current source.
        for table, n in quarantine.by_table.items():
            if table in report.tables:
                report.tables[table].source_quarantined += n
    return report


async def table_checksums(store: RowStore, *, batch_size: int = DEFAULT_BATCH) -> dict[str, Any]:
    """Rows and a checksum per table, as stored (for backup manifests).

    The checksum folds each row's :func:`~kotonoha_bot.db.rowconv.row_digest` in key
    order, exactly like :func:`compare`'s table checksums.
    """
    _, dims = await _dims(store)
    side = _Side(store, UTC, dims)
    out: dict[str, Any] = {}
    for spec in TABLES:
        h = hashlib.blake2b(digest_size=16)
        rows = invalid = 0
        if spec.large:
            async for key, row, _reason, _raw in _items(
                side, spec, batch_size, TransferProgress(), None
            ):
                rows += 1
                if row is None:
                    invalid += 1
                    h.update(b"invalid" + repr(key).encode())
                else:
                    h.update(repr(key).encode() + row_digest(comparable(spec, row)))
        else:
            converted: dict[Any, Row] = {}
            for raw in await store.read_all(spec):
                rows += 1
                row, _reason = side.convert(spec, raw)
                if row is None:
                    invalid += 1
                else:
                    converted[row[spec.key_index]] = row
            for key in sorted(converted, key=lambda k: (str(type(k)), k)):
                h.update(repr(key).encode() + row_digest(comparable(spec, converted[key])))
        out[spec.name] = {"rows": rows, "invalid": invalid, "checksum": h.hexdigest()}
    return out


# --- markers, upgrade, wipe ------------------------------------------------------------


async def migration_marker(url: str, settings: Settings) -> dict[str, Any] | None:
    """The unfinished-migration marker of a database, or None (read-only)."""
    info = await _inspect_target(url, settings)
    text = info.meta.get(MIGRATION_MARKER)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"value": text}
    return value if isinstance(value, dict) else {"value": value}


@dataclass
class UpgradeReport:
    """What `db upgrade` did to a legacy file."""

    path: Path
    backup_path: Path | None
    quarantine_path: Path | None
    quarantined: int
    timezone: str
    legacy: dict[str, Any]
    conversions: Counter[str]
    warnings: list[str]
    verify: VerifyReport | None
    already_current: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINED if self.quarantined else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["conversions"] = dict(self.conversions)
        out["verify"] = self.verify.as_dict() if self.verify else None
        for key in ("path", "backup_path", "quarantine_path"):
            out[key] = str(out[key]) if out[key] is not None else None
        out["exit_code"] = self.exit_code
        return out


async def upgrade(
    url: str,
    *,
    settings: Settings,
    source_timezone: str | None = None,
    backup_dir: Path | None = None,
    quarantine_path: Path | None = None,
    progress: TransferProgress | None = None,
) -> UpgradeReport:
    """Upgrade a legacy SQLite file to the current schema in place, after a backup.

    The conversion is one transaction in the file itself; afterwards the upgraded file
    is verified against the backup (converted by the same rules).
    """
    from kotonoha_bot.db.sqlite_legacy import upgrade_in_place
    from kotonoha_bot.db.sqlite_rows import inspect_file, integrity_check, online_backup

    progress = progress or TransferProgress()
    if parse_database_url(url) != "sqlite":
        raise ConfigError("`db upgrade` converts legacy SQLite files; PostgreSQL has no legacy")
    path = sqlite_path_from_url(url)
    timezone, tz_label = resolve_timezone(source_timezone)
    info = await asyncio.to_thread(inspect_file, path)
    if info.kind == "current":
        return UpgradeReport(
            path, None, None, 0, tz_label, {}, Counter(), [], None, already_current=True
        )
    if info.kind == "missing":
        raise MigrationError(f"{path} does not exist")
    if info.kind != "legacy":
        raise MigrationError(f"{path} is not a legacy kotonoha database ({info.kind})")
    try:
        await asyncio.to_thread(integrity_check, path)
    except CorruptDatabaseError as exc:
        raise MigrationError(f"{exc}; nothing was changed") from None
    directory = backup_dir or settings.backup_dir
    backup = timestamped(directory, f"{path.stem}-legacy", ".db")
    progress.note(f"backing up {path} -> {backup}")
    await asyncio.to_thread(online_backup, path, backup)
    qpath = quarantine_path or timestamped(directory, "kotonoha-quarantine", ".jsonl")
    quarantine = Quarantine(qpath)
    progress.begin("upgrade legacy sessions", info.counts.get("sessions"))
    try:
        result = await asyncio.to_thread(
            upgrade_in_place,
            path,
            timezone=timezone,
            quarantine=quarantine.add,
            on_session=lambda: progress.advance("upgrade legacy sessions", 1),
        )
    finally:
        quarantine.close()
        progress.end("upgrade legacy sessions")
    warnings = []
    if result.ignored_fields:
        warnings.append(
            "legacy message fields not moved: "
            + ", ".join(f"{k} ({n}x)" for k, n in sorted(result.ignored_fields.items()))
        )
    if result.ignored_columns:
        warnings.append("legacy columns not moved: " + ", ".join(result.ignored_columns))
    report = UpgradeReport(
        path=path,
        backup_path=backup.resolve(),
        quarantine_path=qpath.resolve() if quarantine.count else None,
        quarantined=quarantine.count,
        timezone=tz_label,
        legacy=_legacy_summary(result),
        conversions=result.stats,
        warnings=warnings,
        verify=None,
    )
    progress.note("verifying the upgraded file against the backup")
    report.verify = await verify(
        f"sqlite:///{backup}",
        url,
        settings=settings,
        source_timezone=source_timezone,
        progress=progress,
    )
    if not report.verify.identical:
        raise MigrationError(
            f"the upgraded {path} does not match its backup; the original is at {backup}"
        )
    return report


async def wipe(url: str, settings: Settings) -> None:
    """Delete every row of a kotonoha database (the schema stays)."""
    if parse_database_url(url) == "sqlite":
        from kotonoha_bot.db.sqlite_rows import SQLiteRows

        async with open_database(url, settings=settings):
            pass
        store = SQLiteRows(sqlite_path_from_url(url), readonly=False)
        await store.open()
        try:
            await store.wipe()
        finally:
            await store.close()
        return
    from kotonoha_bot.db.postgres_rows import PostgresRows

    async with open_database(url, settings=_small_pool(settings)) as opened:
        writer = PostgresRows(cast("PostgreSQLDatabase", opened), snapshot=False)
        await writer.open()
        try:
            await writer.wipe()
        finally:
            await writer.close()


async def table_counts(url: str, settings: Settings) -> dict[str, int]:
    """Rows per table, read without creating anything (empty dict: no database)."""
    info = await _inspect_target(url, settings)
    return dict(info.counts) if info.has_schema else {}
