"""The SQLite end of a transfer: one file, read through SQLite's own guarantees.

A source file is checked (``PRAGMA integrity_check``) before anything else is opened,
then copied with the online backup API (a running bot's WAL included) and read from
that snapshot; an older schema is upgraded on a private copy, a legacy file (the
pre-ADR-0007 ``sessions`` table) converted into a temporary current file. Backups are
online-backup copies checked before they count. pg_dump archives do not restore here.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

from kotonoha_bot.db import open_database
from kotonoha_bot.db.sqlite.rows import (
    SQLiteRows,
    check_columns,
    check_schema_version,
    inspect_file,
    integrity_check,
    online_backup,
)
from kotonoha_bot.db.sqlite.schema import LATEST_SCHEMA_VERSION
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.errors import ConfigError, CorruptDatabaseError, MigrationError
from kotonoha_bot.transfer.common import timestamped
from kotonoha_bot.transfer.endpoints import RowStore, Source, Target, TargetInfo
from kotonoha_bot.transfer.files import destination, make_dir, make_private, rotate
from kotonoha_bot.transfer.legacy import convert_legacy_file
from kotonoha_bot.transfer.marker import MIGRATION_MARKER
from kotonoha_bot.transfer.reports import BackupResult

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.models import EmbeddingConfig
    from kotonoha_bot.transfer.quarantine import Quarantine
    from kotonoha_bot.transfer.reports import MigrationReport, RestoreResult, TransferProgress

_NO_ARCHIVES = (
    "a pg_dump archive restores into PostgreSQL only; restore it there, then"
    " `kotonoha db migrate` to SQLite"
)


class SQLiteEndpoint:
    """A SQLite file as a transfer source, target or backup subject."""

    accepts_archives = False

    def __init__(self, url: DatabaseURL, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        if url.path is None:  # DatabaseURL gives every sqlite URL a path
            raise ConfigError(f"{url.display()} is not a SQLite URL")
        self.path: Path = url.path
        self.file: Path | None = url.path

    async def inspect(self) -> TargetInfo:
        info = await asyncio.to_thread(inspect_file, self.path)
        return TargetInfo(
            info.kind, info.kind == "current", info.counts, info.meta, info.schema_version
        )

    @contextlib.asynccontextmanager
    async def source(
        self,
        *,
        timezone: tzinfo,
        backup_dir: Path | None,
        quarantine: Quarantine,
        report: MigrationReport | None,
        progress: TransferProgress,
    ) -> AsyncIterator[Source]:
        """Check the file, back it up, convert a legacy file; yield a snapshot reader."""
        path, settings = self.path, self.settings
        if not path.is_file():
            raise MigrationError(f"source {path} does not exist")
        try:
            progress.note(f"checking {path} (PRAGMA integrity_check)")
            await asyncio.to_thread(integrity_check, path)
            info = await asyncio.to_thread(inspect_file, path)
        except CorruptDatabaseError as exc:
            raise MigrationError(
                f"{exc}; nothing was written (the target was not opened)"
            ) from None
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
            # Named after this database (label has a hash of its identity) and rotated
            # like the regular backups, so reruns cannot fill the disk with safety copies.
            label = f"{self.url.label}-premigrate"
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
                # An older schema is upgraded on a private copy (the source and its
                # backup stay as they are): the migrations fill in the new columns.
                upgraded = Path(tmp) / "upgraded.db"
                progress.note(f"upgrading a copy of {path} from schema {info.schema_version}")
                await asyncio.to_thread(online_backup, read_path, upgraded)
                async with open_database(f"sqlite:///{upgraded}", settings=settings):
                    pass
                await asyncio.to_thread(check_columns, upgraded)
                read_path = upgraded
            if info.kind == "legacy":
                kind = "legacy"
                read_path = await convert_legacy_file(
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
                yield Source(store, kind, self.url.identity)
            finally:
                await store.close()

    @contextlib.asynccontextmanager
    async def reader(self, role: str) -> AsyncIterator[RowStore]:
        info = await asyncio.to_thread(inspect_file, self.path)
        if info.kind != "current":
            raise MigrationError(f"{role} {self.path} holds no kotonoha database ({info.kind})")
        check_schema_version(self.path, info.schema_version)
        store = SQLiteRows(self.path, readonly=True)
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    @contextlib.asynccontextmanager
    async def writer(
        self, embedding: EmbeddingConfig | None, marker: str, mode: str
    ) -> AsyncIterator[Target]:
        url, settings = self.url, self.settings
        async with open_database(url, settings=settings):
            pass  # creates the file and its schema
        writer = SQLiteRows(self.path, readonly=False)
        await writer.open()
        try:
            await writer.set_meta(MIGRATION_MARKER, marker)
            if mode == "restart":
                await writer.wipe()
                await writer.set_meta(MIGRATION_MARKER, marker)
            if embedding is not None:
                async with open_database(url, settings=settings) as db:
                    await db.set_embedding_config(embedding)
            yield Target(writer)
        finally:
            await writer.close()

    def check_can_index(self, embedding: EmbeddingConfig | None) -> None:
        """SQLite searches exactly (no ANN index): any dimension moves here."""

    async def wipe(self) -> None:
        async with open_database(self.url, settings=self.settings):
            pass
        store = SQLiteRows(self.path, readonly=False)
        await store.open()
        try:
            await store.wipe()
        finally:
            await store.close()

    async def backup(
        self, label: str, output: str | Path | None, progress: TransferProgress | None
    ) -> BackupResult:
        """An online-backup copy, integrity-checked before it counts."""
        source = self.path
        if not source.is_file():
            raise MigrationError(f"{source} does not exist")
        dest, rotate_dir = destination(self.settings, label, output, ".db")
        make_dir(dest.parent)
        await asyncio.to_thread(online_backup, source, dest)
        make_private(dest)
        try:
            await asyncio.to_thread(integrity_check, dest)
        except CorruptDatabaseError as exc:
            dest.unlink(missing_ok=True)
            raise MigrationError(f"the backup failed its check and was deleted: {exc}") from None
        rotated = rotate(rotate_dir, label, self.settings.backup_keep) if rotate_dir else []
        return BackupResult(dest, "sqlite-online-backup", dest.stat().st_size, 0.0, rotated=rotated)

    async def check_archive(self, path: Path) -> None:
        raise ConfigError(_NO_ARCHIVES)

    async def restore_archive(self, path: Path, started: float, wiped: bool) -> RestoreResult:
        raise ConfigError(_NO_ARCHIVES)
