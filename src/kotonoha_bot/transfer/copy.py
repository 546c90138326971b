"""Move a whole database between SQLite and PostgreSQL, and prove the copy is exact.

``migrate`` copies every table (sessions, messages, knowledge sources and chunks with
bit-exact float32 embeddings, kotonoha_meta with the recorded embedding model, and a
running re-embedding's staged vectors) from a source to an empty target:

1. The source is checked (``PRAGMA integrity_check`` for SQLite) before the target is
   even opened, then a SQLite source is copied with the online backup API (a running
   bot's WAL included) and the migration reads that snapshot. A legacy database (the
   pre-ADR-0007 ``sessions`` table) is first converted into a temporary current file.
2. Every row passes :class:`~kotonoha_bot.transfer.rowconv.RowConverter`: moved faithfully
   (the NUL rule and the documented conversions applied and counted) or written to
   the quarantine file with its table, key and reason. Nothing is dropped silently.
3. The target gets the marker ``migration_in_progress`` in kotonoha_meta before any row,
   rows go in key-ordered batches (one transaction each; COPY on PostgreSQL), then
   message counts and id sequences are fixed up, the vector index is rebuilt, and
   :func:`~kotonoha_bot.transfer.verify.compare` verifies the target against the
   source. Only a clean verification removes the marker.
4. A rerun after a crash (kill -9, lost connection, full disk) resumes: it skips the
   keys the target holds and continues after the highest one. ``restart=True`` wipes
   the partial copy instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db.tables import CHUNKS, MESSAGES, META, PARENTS, TABLES, Row, TableSpec
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.errors import ConfigError, KotonohaError, MigrationError
from kotonoha_bot.models import EmbeddingConfig
from kotonoha_bot.transfer.common import (
    DEFAULT_BATCH,
    DEFAULT_MAX_DIFFS,
    embedding_from_meta,
    key_text,
    prefetch,
    resolve_timezone,
    timestamped,
)
from kotonoha_bot.transfer.endpoints import (
    Endpoint,
    RowStore,
    Source,
    TargetInfo,
    display_url,
    endpoint_for,
    identity,
)
from kotonoha_bot.transfer.marker import MIGRATION_MARKER, UNMOVED_META_KEYS
from kotonoha_bot.transfer.quarantine import Quarantine
from kotonoha_bot.transfer.reports import (
    MigrationReport,
    TableReport,
    TransferProgress,
    VerificationFailedError,
)
from kotonoha_bot.transfer.rowconv import Reject, RowConverter, jsonable
from kotonoha_bot.transfer.verify import compare

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

#: Meta keys the transfer records through the contract (set_embedding_config).
EMBEDDING_KEYS = ("embedding_model", "embedding_dimension")
#: Tables read whole (small) and tables copied in key-ordered batches, in copy order.
SMALL_TABLES = tuple(t for t in TABLES if not t.large)


LARGE_TABLES = tuple(t for t in TABLES if t.large)


def _plan(info: TargetInfo, target: str, identity: str, restart: bool) -> str:
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


def _check_target_meta(info: TargetInfo, source_meta: dict[str, str], target: str) -> None:
    """A fresh target may only hold meta rows that equal the source's."""
    if MIGRATION_MARKER in info.meta:
        return
    for key, value in info.meta.items():
        if key not in UNMOVED_META_KEYS and source_meta.get(key) != value:
            raise MigrationError(
                f"target {target} is not empty: kotonoha_meta {key!r} = {value!r} differs"
                f" from the source ({source_meta.get(key)!r})"
            )


class Copier:
    """One migration's state: the converter, the quarantine, the per-table reports."""

    def __init__(
        self,
        source: Source,
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
        self.embedding = embedding_from_meta(plain, "embedding")
        reembed = embedding_from_meta(plain, "reembed")
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
            have = {key_text(r[spec.key_index]) for r in await target.read_all(spec)}
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
        present = {key_text(r[spec.key_index]) for r in await target.read_all(spec)}
        todo = [r for r in rows if key_text(r[spec.key_index]) not in present]
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
        async for raws in prefetch(store.batches(spec, after=high, size=self.batch)):
            rows = self._convert(spec, raws)
            self.progress.advance(spec.name, len(raws) - len(rows))
            await self._insert(spec, target, rows)
        self.progress.end(spec.name)


async def migrate(
    source_url: str | DatabaseURL,
    target_url: str | DatabaseURL,
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
    target = endpoint_for(target_url, settings)
    source_identity = identity(source_url)
    target_name = identity(target_url)
    if source_identity == target_name:
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
        async with endpoint_for(source_url, settings).source(
            timezone=timezone,
            backup_dir=backups,
            quarantine=quarantine,
            report=report,
            progress=progress,
        ) as source:
            report.source_kind = source.kind
            copier = Copier(source, report, quarantine, timezone, batch_size, progress)
            await copier.prepare()
            info = await target.inspect()
            try:
                report.mode = _plan(info, report.target, source_identity, restart)
                if report.mode == "fresh":
                    _check_target_meta(info, copier.meta, report.target)
                target.check_can_index(copier.embedding)
            except MigrationError as exc:
                if not dry_run:
                    raise
                report.mode = "refuse"
                report.warnings.append(str(exc))
            try:
                if dry_run:
                    await copier.dry_run()
                else:
                    await _run(copier, source, target, report, progress, max_diffs)
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
    copier: Copier,
    source: Source,
    target: Endpoint,
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
        async with target.writer(copier.embedding, marker, report.mode) as opened:
            writer = opened.store
            if report.mode == "resume":
                await copier.check_resumable(writer)
            await copier.copy(writer)
            progress.note("fixing message counts and id sequences")
            report.message_counts_fixed = await writer.fix_message_counts()
            marks = await source.store.sequence_marks()
            await writer.set_sequences(marks)
            if opened.rebuild_index is not None:
                progress.note("building the vector index")
                await opened.rebuild_index()
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
