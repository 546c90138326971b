"""Backups of either backend, with rotation, and restores that verify what they restored.

- SQLite: SQLite's online backup API (consistent while the bot writes, WAL included),
  then ``PRAGMA integrity_check`` on the copy.
- PostgreSQL with a compatible ``pg_dump`` on PATH (its major version >= the server's):
  ``pg_dump -Fc`` from a snapshot exported by our own REPEATABLE READ transaction, and a
  manifest (rows and checksum per table, :func:`~kotonoha_bot.db.transfer.table_checksums`)
  read from that same snapshot, so a restore can be verified row for row.
- PostgreSQL otherwise: a logical export — the database migrated into a timestamped
  SQLite file by :func:`~kotonoha_bot.db.transfer.migrate` and verified against it.

Backups are named ``<label>-YYYYmmdd-HHMMSS-ffffff.(db|dump)`` (label: the SQLite file's
stem or the PostgreSQL database's name); rotation keeps the newest ``BACKUP_KEEP`` of
one label and never touches another file. Files are created readable by their owner
only: they hold a community's conversations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kotonoha_bot.db import DatabaseURL, open_database, parse_database_url, sqlite_path_from_url
from kotonoha_bot.db.sqlite_files import create_private
from kotonoha_bot.db.transfer import (
    MigrationReport,
    TransferProgress,
    check_target_can_index,
    display_url,
    migrate,
    table_checksums,
    table_counts,
    timestamped,
    wipe,
)
from kotonoha_bot.errors import ConfigError, CorruptDatabaseError, KotonohaError, MigrationError
from kotonoha_bot.models import BackupRecord, utcnow
from kotonoha_bot.redact import redact

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.db.postgres import PostgreSQLDatabase

log = logging.getLogger("kotonoha_bot.db")

SQLITE_MAGIC = b"SQLite format 3\x00"
PGDUMP_MAGIC = b"PGDMP"
MANIFEST_SUFFIX = ".manifest.json"
_STAMP = r"\d{8}-\d{6}-\d{6}"
_VERSION_RE = re.compile(r"\b(\d+)(?:\.\d+)?")


@dataclass
class BackupResult:
    """What ``backup_database`` wrote."""

    path: Path
    method: str  # sqlite-online-backup | pg_dump | logical-export
    size_bytes: int
    seconds: float
    manifest: Path | None = None
    rotated: list[Path] = field(default_factory=list)
    rows: int = 0
    note: str = ""


@dataclass
class RestoreResult:
    """What ``restore_backup`` did."""

    path: Path
    target: str
    method: str  # migrate | pg_restore
    verified: str
    seconds: float
    wiped: bool
    report: MigrationReport | None = None
    safety_copy: Path | None = None


def _label(url: str) -> str:
    return DatabaseURL.parse(url).label


def _private(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.chmod(0o600)


def _make_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)


def rotate(directory: Path, label: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups named ``label-<stamp>.(db|dump)``."""
    pattern = re.compile(rf"^{re.escape(label)}-{_STAMP}\.(db|dump)$")
    if not directory.is_dir():
        return []
    ours = sorted((p for p in directory.iterdir() if pattern.match(p.name)), reverse=True)
    removed = []
    for old in ours[keep:]:
        old.unlink(missing_ok=True)
        Path(str(old) + MANIFEST_SUFFIX).unlink(missing_ok=True)
        removed.append(old)
    return removed


def _destination(
    settings: Settings, label: str, output: str | Path | None, suffix: str
) -> tuple[Path, Path | None]:
    """The file to write and the directory to rotate (None: an explicit file name).

    ``output`` is read as the operator wrote it: a trailing ``/`` means a directory
    even before it exists (``Path`` would drop the slash and make it a file name that
    every later run overwrites). An explicit file that exists is never overwritten.
    """
    if output is not None:
        text = str(output)
        as_dir = text.endswith(("/", os.sep)) or Path(text).is_dir()
        if not as_dir:
            dest = Path(text).resolve()
            if dest.exists():
                raise MigrationError(
                    f"{dest} already exists; give a new file name, or a directory"
                    " (ending in /) to get timestamped, rotated backups"
                )
            return dest, None
    directory = Path(output if output is not None else settings.backup_dir).resolve()
    return timestamped(directory, label, suffix), directory


# --- PostgreSQL tools ----------------------------------------------------------------


def _tool_major(tool: str) -> int | None:
    import subprocess

    try:
        out = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(out.split(")")[-1] if ")" in out else out)
    return int(match.group(1)) if match else None


def find_pg_tool(name: str, server_major: int) -> str | None:
    """``name`` (pg_dump, pg_restore) from PATH when its major version >= the server's."""
    tool = shutil.which(name)
    if tool is None:
        return None
    major = _tool_major(tool)
    return tool if major is not None and major >= server_major else None


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A libpq URI without the password, and the environment that carries it."""
    uri, secret_env = DatabaseURL.parse(url).libpq()
    return uri, {**os.environ, **secret_env}


async def _run_tool(args: list[str], env: dict[str, str], what: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        tail = " ".join(err.decode("utf-8", "replace").strip().splitlines()[-3:])
        raise MigrationError(f"{what} failed (exit {proc.returncode}): {redact(tail)}")


def _small(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"database_pool_min_size": 1, "database_pool_max_size": 2, "database_read_url": None}
    )


async def _server_major(url: str, settings: Settings) -> int:
    from kotonoha_bot.db.postgres_rows import inspect_database

    db = cast("PostgreSQLDatabase", open_database(url, settings=_small(settings)))
    info = await inspect_database(db)
    if not info.has_schema:
        raise MigrationError(f"{db.location} holds no kotonoha database")
    return info.server_version_num // 10000


# --- backup ----------------------------------------------------------------------------


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
    if parse_database_url(url) == "sqlite" and not sqlite_path_from_url(url).is_file():
        return  # nothing to record in (and never create a file for it)
    try:
        async with open_database(url, settings=_small(settings)) as db:
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
    label = _label(url) + (f"-{kind}" if kind else "")
    started = time.perf_counter()
    if parse_database_url(url) == "sqlite":
        result = await _backup_sqlite(settings, url, label, output)
    else:
        major = await _server_major(url, settings)
        pg_dump = await asyncio.to_thread(find_pg_tool, "pg_dump", major)
        if pg_dump is not None:
            result = await _backup_pg_dump(settings, url, label, output, pg_dump)
        else:
            result = await _backup_logical(settings, url, label, output, progress)
            result.note = (
                f"no pg_dump of major version >= {major} on PATH: wrote a verified logical"
                " export (a SQLite file) instead"
            )
    result.seconds = time.perf_counter() - started
    return result


async def run_backup(settings: Settings, db_url: str | None = None) -> Path:
    """Back up and rotate (the bot calls this every BACKUP_INTERVAL_HOURS); the new file."""
    return (await backup_database(settings, db_url)).path


async def _backup_sqlite(
    settings: Settings, url: str, label: str, output: str | Path | None
) -> BackupResult:
    from kotonoha_bot.db.sqlite_rows import integrity_check, online_backup

    source = sqlite_path_from_url(url)
    if not source.is_file():
        raise MigrationError(f"{source} does not exist")
    dest, rotate_dir = _destination(settings, label, output, ".db")
    _make_dir(dest.parent)
    await asyncio.to_thread(online_backup, source, dest)
    _private(dest)
    try:
        await asyncio.to_thread(integrity_check, dest)
    except CorruptDatabaseError as exc:
        dest.unlink(missing_ok=True)
        raise MigrationError(f"the backup failed its check and was deleted: {exc}") from None
    rotated = rotate(rotate_dir, label, settings.backup_keep) if rotate_dir else []
    return BackupResult(dest, "sqlite-online-backup", dest.stat().st_size, 0.0, rotated=rotated)


async def _backup_pg_dump(
    settings: Settings, url: str, label: str, output: str | Path | None, pg_dump: str
) -> BackupResult:
    from kotonoha_bot.db.postgres_rows import PostgresRows

    dest, rotate_dir = _destination(settings, label, output, ".dump")
    _make_dir(dest.parent)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    create_private(partial)  # pg_dump keeps the mode of a file that exists: 0600 from birth
    uri, env = _libpq(url)
    async with open_database(url, settings=_small(settings)) as opened:
        store = PostgresRows(cast("PostgreSQLDatabase", opened), snapshot=True)
        await store.open()
        try:
            snapshot = await store.export_snapshot()
            # pg_dump reads exactly the rows our open transaction sees.
            dump = asyncio.create_task(
                _run_tool(
                    [
                        pg_dump,
                        "--format=custom",
                        "--no-password",
                        f"--snapshot={snapshot}",
                        f"--file={partial}",
                        f"--dbname={uri}",
                    ],
                    env,
                    "pg_dump",
                )
            )
            try:
                manifest = await table_checksums(store)
            finally:
                await dump
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            await store.close()
    _private(partial)
    manifest_path = Path(str(dest) + MANIFEST_SUFFIX)
    text = json.dumps({"source": display_url(url), "tables": manifest}, indent=2)
    await asyncio.to_thread(manifest_path.write_text, text, encoding="utf-8")
    _private(manifest_path)
    partial.replace(dest)
    rotated = rotate(rotate_dir, label, settings.backup_keep) if rotate_dir else []
    rows = sum(int(t["rows"]) for t in manifest.values())
    return BackupResult(
        dest,
        "pg_dump",
        dest.stat().st_size,
        0.0,
        manifest=manifest_path,
        rotated=rotated,
        rows=rows,
    )


async def _backup_logical(
    settings: Settings,
    url: str,
    label: str,
    output: str | Path | None,
    progress: TransferProgress | None,
) -> BackupResult:
    from kotonoha_bot.db.sqlite_rows import finalize_file

    dest, rotate_dir = _destination(settings, label, output, ".db")
    _make_dir(dest.parent)
    partial = dest.with_name(dest.name + ".partial")
    quarantine = dest.with_name(dest.name + ".quarantine.jsonl")
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
    try:
        report = await migrate(
            url,
            f"sqlite:///{partial}",
            settings=settings,
            backup_source=False,
            quarantine_path=quarantine,
            progress=progress,
        )
        await asyncio.to_thread(finalize_file, partial)
    except BaseException:
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)
        raise
    _private(partial)
    partial.replace(dest)
    rotated = rotate(rotate_dir, label, settings.backup_keep) if rotate_dir else []
    rows = sum(t.moved for t in report.tables.values())
    if report.quarantined:
        raise MigrationError(
            f"backup {dest} is incomplete: {report.quarantined} rows could not be exported"
            f" (see {quarantine})"
        )
    return BackupResult(
        dest, "logical-export", dest.stat().st_size, 0.0, rotated=rotated, rows=rows
    )


# --- restore ---------------------------------------------------------------------------


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
    if kind == "pg_dump" and parse_database_url(url) == "sqlite":
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
        await check_pg_dump_backup(path, url, settings)
    safety: Path | None = None
    if not empty:
        progress.note(f"writing a safety copy of {display_url(url)} before wiping it")
        safety = (await backup_database(settings, url, kind="prerestore", progress=progress)).path
    try:
        if kind == "pg_dump":
            result = await _restore_pg_dump(path, url, settings, started, not empty)
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
    check_target_can_index(url, report.embedding)
    if report.quarantined:
        samples = "; ".join(
            f"{e['table']} {e['key']!r}: {e['reason']}" for e in report.quarantine_samples[:3]
        )
        raise MigrationError(
            f"{path} holds {report.quarantined} rows that cannot be restored ({samples});"
            " nothing was changed"
        )


async def check_pg_dump_backup(path: Path, url: str, settings: Settings) -> None:
    """``pg_restore --list`` reads the whole table of contents: a damaged archive fails here."""
    major = await _server_major_any(url, settings)
    pg_restore = await asyncio.to_thread(find_pg_tool, "pg_restore", major)
    if pg_restore is None:
        raise MigrationError(
            f"restoring a pg_dump archive needs pg_restore of major version >= {major} on PATH;"
            " nothing was changed"
        )
    try:
        await _run_tool([pg_restore, "--list", str(path)], dict(os.environ), "pg_restore --list")
    except MigrationError as exc:
        raise MigrationError(
            f"{path} is not a readable pg_dump archive ({exc}); nothing was changed"
        ) from None


async def _server_major_any(url: str, settings: Settings) -> int:
    from kotonoha_bot.db.postgres_rows import inspect_database

    db = cast("PostgreSQLDatabase", open_database(url, settings=_small(settings)))
    return (await inspect_database(db)).server_version_num // 10000


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


async def _restore_pg_dump(
    path: Path, url: str, settings: Settings, started: float, wiped: bool
) -> RestoreResult:
    from kotonoha_bot.db.postgres_rows import PostgresRows, inspect_database

    db = cast("PostgreSQLDatabase", open_database(url, settings=_small(settings)))
    major = (await inspect_database(db)).server_version_num // 10000
    pg_restore = await asyncio.to_thread(find_pg_tool, "pg_restore", major)
    if pg_restore is None:
        raise MigrationError(
            f"restoring a pg_dump archive needs pg_restore of major version >= {major} on PATH"
        )
    uri, env = _libpq(url)
    # --clean --if-exists replaces the (empty or wiped) kotonoha schema; one transaction,
    # so a failure leaves the database as it was.
    await _run_tool(
        [
            pg_restore,
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
            f"--dbname={uri}",
            str(path),
        ],
        env,
        "pg_restore",
    )
    manifest_path = Path(str(path) + MANIFEST_SUFFIX)
    async with open_database(url, settings=_small(settings)) as opened:
        store = PostgresRows(cast("PostgreSQLDatabase", opened), snapshot=True)
        await store.open()
        try:
            restored = await table_checksums(store)
            problems = {k: n for k, n in (await store.integrity()).items() if n}
        finally:
            await store.close()
    if problems:
        raise MigrationError(f"the restored database is inconsistent: {problems}")
    manifest_text = await asyncio.to_thread(_read_optional, manifest_path)
    if manifest_text is None:
        verified = "no manifest beside the dump: row checksums not compared; references checked"
    else:
        expected = json.loads(manifest_text)["tables"]
        differ = [t for t in expected if expected[t] != restored.get(t)]
        if differ:
            raise MigrationError(
                f"the restored database differs from the backup's manifest in {', '.join(differ)}"
            )
        rows = sum(int(t["rows"]) for t in restored.values())
        verified = f"{rows} rows: counts and checksums equal the backup's manifest"
    return RestoreResult(
        path, display_url(url), "pg_restore", verified, time.perf_counter() - started, wiped
    )


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


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
