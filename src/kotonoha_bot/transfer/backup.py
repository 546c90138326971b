"""Backups of either backend, with rotation, and restores that verify what they restored.

Each backend's endpoint writes its own kind of backup (``transfer/sqlite.py``: SQLite's
online backup API then ``PRAGMA integrity_check``; ``transfer/postgres.py``: ``pg_dump
-Fc`` with a manifest, or a verified logical export into a SQLite file); this module
names and rotates them (:mod:`kotonoha_bot.transfer.files`) and restores. A SQLite
backup restores into either backend through the migration (a dry run first); a
pg_dump archive restores into PostgreSQL only. The bot's periodic backups are
scheduled by the bot layer (``bot/client.py``), which calls :func:`run_backup`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db import open_database
from kotonoha_bot.errors import ConfigError, KotonohaError, MigrationError
from kotonoha_bot.models import BackupRecord, utcnow
from kotonoha_bot.redact import redact
from kotonoha_bot.transfer.common import timestamped
from kotonoha_bot.transfer.copy import migrate
from kotonoha_bot.transfer.endpoints import (
    display_url,
    endpoint_for,
    small_pool,
    table_counts,
    wipe,
)
from kotonoha_bot.transfer.files import rotate
from kotonoha_bot.transfer.reports import BackupResult, RestoreResult, TransferProgress

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

__all__ = [
    "BackupResult",
    "RestoreResult",
    "backup_database",
    "backup_kind",
    "check_sqlite_backup",
    "describe",
    "restore_backup",
    "rotate",
    "run_backup",
    "target_is_empty",
]

log = logging.getLogger("kotonoha_bot.db")

SQLITE_MAGIC = b"SQLite format 3\x00"
PGDUMP_MAGIC = b"PGDMP"


async def backup_database(
    settings: Settings,
    db_url: str | None = None,
    *,
    output: str | Path | None = None,
    kind: str = "",
    progress: TransferProgress | None = None,
) -> BackupResult:
    """Back up the database at ``db_url`` (default: the configured one), then rotate.

    ``kind`` (e.g. ``prerestore``) goes into the name, and rotation keeps
    ``BACKUP_KEEP`` files of each kind of each database separately.
    """
    url = db_url or settings.database_location()
    if kind:
        return await _backup(settings, url, output, kind, progress)
    # An ordinary backup (the bot's schedule, `db backup`, the dashboard) is recorded in
    # the database itself, so the dashboard of any process can show the last one.
    try:
        result = await _backup(settings, url, output, kind, progress)
    except KotonohaError as exc:
        await _record(settings, url, BackupRecord(utcnow(), False, error=redact(str(exc))))
        raise
    await _record(
        settings,
        url,
        BackupRecord(utcnow(), True, str(result.path), result.method, result.size_bytes),
    )
    return result


async def _record(settings: Settings, url: str, record: BackupRecord) -> None:
    """Keep the outcome in the backed-up database; never fails the backup itself."""
    file = endpoint_for(url, settings).file
    if file is not None and not file.is_file():
        return  # nothing to record in (and never create a file for it)
    try:
        async with open_database(url, settings=small_pool(settings)) as db:
            await db.record_backup(record)
    except KotonohaError as exc:
        log.warning("could not record the backup outcome in the database: %s", exc)


async def _backup(
    settings: Settings,
    url: str,
    output: str | Path | None,
    kind: str,
    progress: TransferProgress | None,
) -> BackupResult:
    endpoint = endpoint_for(url, settings)
    label = endpoint.url.label + (f"-{kind}" if kind else "")
    started = time.perf_counter()
    result = await endpoint.backup(label, output, progress)
    result.seconds = time.perf_counter() - started
    return result


async def run_backup(settings: Settings, db_url: str | None = None) -> Path:
    """Back up and rotate (the bot calls this every BACKUP_INTERVAL_HOURS); the new file."""
    return (await backup_database(settings, db_url)).path


def backup_kind(path: Path) -> str:
    """``sqlite`` or ``pg_dump``, from the file's first bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror}") from None
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(PGDUMP_MAGIC):
        return "pg_dump"
    raise MigrationError(f"{path} is neither a SQLite file nor a pg_dump custom-format archive")


async def target_is_empty(url: str, settings: Settings) -> bool:
    """No rows at all (kotonoha_meta included): nothing a restore could overwrite."""
    counts = await table_counts(url, settings)
    return not any(counts.values())


async def restore_backup(
    path: Path,
    settings: Settings,
    db_url: str | None = None,
    *,
    wipe_first: bool = False,
    progress: TransferProgress | None = None,
) -> RestoreResult:
    """Restore ``path`` into an empty database (``wipe_first`` empties it), then verify.

    The order is what keeps a community's data: (1) the backup is checked completely
    — readable, kotonoha's, every row convertible (a dry run of the copy) — while the
    target is untouched; (2) when ``wipe_first`` has rows to delete, a safety copy of
    the target is written first (a regular, verified backup named ``-prerestore-``);
    (3) only then is the target wiped and the backup copied in. Any failure after (2)
    names the safety copy and the one command that puts it back.
    """
    url = db_url or settings.database_location()
    started = time.perf_counter()
    progress = progress or TransferProgress()
    kind = backup_kind(path)
    target = endpoint_for(url, settings)
    if kind == "pg_dump" and not target.accepts_archives:
        raise ConfigError(
            "a pg_dump archive restores into PostgreSQL only; restore it there, then"
            " `kotonoha db migrate` to SQLite"
        )
    empty = await target_is_empty(url, settings)
    if not empty and not wipe_first:
        raise MigrationError(
            f"{display_url(url)} is not empty; restore into an empty database, or add --wipe"
            " to delete its rows first"
        )
    if kind == "sqlite":
        await check_sqlite_backup(path, url, settings, target_empty=empty, progress=progress)
    else:
        await target.check_archive(path)
    safety: Path | None = None
    if not empty:
        progress.note(f"writing a safety copy of {display_url(url)} before wiping it")
        safety = (await backup_database(settings, url, kind="prerestore", progress=progress)).path
    try:
        if kind == "pg_dump":
            result = await target.restore_archive(path, started, not empty)
        else:
            result = await _restore_sqlite(path, url, settings, started, not empty, progress)
    except KotonohaError as exc:
        if safety is None:
            raise
        raise MigrationError(
            f"{exc}. The rows --wipe replaced are kept in {safety}; put them back with"
            f" `kotonoha db restore {safety} --wipe --yes`"
        ) from None
    result.safety_copy = safety
    return result


async def check_sqlite_backup(
    path: Path,
    url: str,
    settings: Settings,
    *,
    target_empty: bool,
    progress: TransferProgress | None = None,
) -> None:
    """Refuse a SQLite backup that cannot be restored completely; the target is not touched.

    A dry run of the copy: integrity check, kotonoha schema, every row converted.
    """
    report = await migrate(
        f"sqlite:///{path}", url, settings=settings, dry_run=True, progress=progress
    )
    if report.mode == "refuse" and target_empty:
        # Not the "target is not empty" refusal that --wipe answers: a foreign or legacy
        # target file, another embedding model's meta rows, too many dimensions.
        reason = report.warnings[-1] if report.warnings else "the target cannot take it"
        raise MigrationError(f"{reason}; nothing was changed")
    endpoint_for(url, settings).check_can_index(report.embedding)
    if report.quarantined:
        samples = "; ".join(
            f"{e['table']} {e['key']!r}: {e['reason']}" for e in report.quarantine_samples[:3]
        )
        raise MigrationError(
            f"{path} holds {report.quarantined} rows that cannot be restored ({samples});"
            " nothing was changed"
        )


async def _restore_sqlite(
    path: Path,
    url: str,
    settings: Settings,
    started: float,
    wipe_target: bool,
    progress: TransferProgress,
) -> RestoreResult:
    if wipe_target:
        await wipe(url, settings)
    quarantine = timestamped(settings.backup_dir, "kotonoha-quarantine", ".jsonl")
    report = await migrate(
        f"sqlite:///{path}",
        url,
        settings=settings,
        backup_source=False,
        quarantine_path=quarantine,
        progress=progress,
    )
    if report.quarantined:
        raise MigrationError(
            f"restored, but {report.quarantined} rows of the backup could not be stored"
            f" (see {report.quarantine_path})"
        )
    rows = sum(t.matching for t in report.verify.tables.values()) if report.verify else 0
    return RestoreResult(
        path,
        display_url(url),
        "migrate",
        f"{rows} rows identical to the backup",
        time.perf_counter() - started,
        wipe_target,
        report,
    )


def describe(result: BackupResult) -> dict[str, Any]:
    """A JSON-ready description of a backup."""
    return {
        "path": str(result.path),
        "method": result.method,
        "size_bytes": result.size_bytes,
        "seconds": round(result.seconds, 3),
        "manifest": str(result.manifest) if result.manifest else None,
        "rotated": [str(p) for p in result.rotated],
        "rows": result.rows,
        "note": result.note,
    }
