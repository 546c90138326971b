"""The PostgreSQL end of a transfer: snapshot reads, COPY writes, pg_dump and pg_restore.

A reader is one REPEATABLE READ transaction (every table read from the same
snapshot); a writer loads without the ANN index and builds it once at the end.
Backups: with a compatible ``pg_dump`` on PATH (its major version >= the server's),
``pg_dump -Fc`` from a snapshot exported by our own transaction, and a manifest (rows
and checksum per table) read from that same snapshot, so a restore can be verified
row for row; otherwise a logical export, the database migrated into a timestamped
SQLite file and verified against it. pgvector indexes at most
:data:`~kotonoha_bot.db.postgres.schema.HALFVEC_INDEX_MAX_DIM` dimensions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

from kotonoha_bot.db.postgres.database import PostgreSQLDatabase
from kotonoha_bot.db.postgres.rows import PgInfo, PostgresRows, inspect_database
from kotonoha_bot.db.postgres.schema import HALFVEC_INDEX_MAX_DIM
from kotonoha_bot.db.sqlite.files import create_private
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.errors import MigrationError
from kotonoha_bot.redact import redact
from kotonoha_bot.transfer.endpoints import (
    RowStore,
    Source,
    Target,
    TargetInfo,
    display_url,
    small_pool,
)
from kotonoha_bot.transfer.files import MANIFEST_SUFFIX, destination, make_dir, make_private, rotate
from kotonoha_bot.transfer.marker import MIGRATION_MARKER
from kotonoha_bot.transfer.reports import BackupResult, RestoreResult

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.models import EmbeddingConfig
    from kotonoha_bot.transfer.quarantine import Quarantine
    from kotonoha_bot.transfer.reports import MigrationReport, TransferProgress

_VERSION_RE = re.compile(r"\b(\d+)(?:\.\d+)?")


def _tool_major(tool: str) -> int | None:
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


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


class PostgresEndpoint:
    """A PostgreSQL database as a transfer source, target or backup subject."""

    accepts_archives = True
    file: Path | None = None

    def __init__(self, url: DatabaseURL, settings: Settings) -> None:
        self.url = url
        self.settings = settings

    def _database(self) -> PostgreSQLDatabase:
        """A not-yet-connected backend with the tool's small pool."""
        return PostgreSQLDatabase(self.url, settings=small_pool(self.settings))

    def _libpq(self) -> tuple[str, dict[str, str]]:
        """A libpq URI without the password, and the environment that carries it."""
        uri, secret_env = self.url.libpq()
        return uri, {**os.environ, **secret_env}

    async def _info(self) -> PgInfo:
        return await inspect_database(self._database())

    async def _server_major(self, *, require_schema: bool) -> int:
        db = self._database()
        info = await inspect_database(db)
        if require_schema and not info.has_schema:
            raise MigrationError(f"{db.location} holds no kotonoha database")
        return info.server_version_num // 10000

    async def inspect(self) -> TargetInfo:
        pg = await self._info()
        return TargetInfo(
            "postgresql",
            pg.has_schema,
            pg.counts,
            pg.meta,
            pg.schema_version,
            pg.server_version_num,
        )

    @contextlib.asynccontextmanager
    async def reader(self, role: str) -> AsyncIterator[RowStore]:
        db = self._database()
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
        """A snapshot reader (a server has no legacy format and no file to copy first)."""
        async with self.reader("source") as store:
            yield Source(store, "postgresql", self.url.identity)

    @contextlib.asynccontextmanager
    async def writer(
        self, embedding: EmbeddingConfig | None, marker: str, mode: str
    ) -> AsyncIterator[Target]:
        async with self._database() as db:
            writer = PostgresRows(db, snapshot=False)
            await writer.open()
            try:
                await writer.set_meta(MIGRATION_MARKER, marker)
                if mode == "restart":
                    await writer.wipe()
                    await writer.set_meta(MIGRATION_MARKER, marker)
                if embedding is not None:
                    await db.set_embedding_config(embedding)
                # Loading without the ANN index and building it once is far faster.
                await writer.drop_vector_index()
                yield Target(writer, db.rebuild_vector_index)
            finally:
                await writer.close()

    def check_can_index(self, embedding: EmbeddingConfig | None) -> None:
        """pgvector indexes at most 4000 dimensions: say so before anything is written."""
        if embedding is not None and embedding.dimension > HALFVEC_INDEX_MAX_DIM:
            raise MigrationError(
                f"the source's embedding model {embedding.model!r} has {embedding.dimension}"
                f" dimensions; pgvector indexes at most {HALFVEC_INDEX_MAX_DIM}. Re-embed with"
                " a smaller model first (`kotonoha kb reembed`), or stay on SQLite"
            )

    async def wipe(self) -> None:
        async with self._database() as db:
            writer = PostgresRows(db, snapshot=False)
            await writer.open()
            try:
                await writer.wipe()
            finally:
                await writer.close()

    # --- backups ----------------------------------------------------------------------

    async def backup(
        self, label: str, output: str | Path | None, progress: TransferProgress | None
    ) -> BackupResult:
        major = await self._server_major(require_schema=True)
        pg_dump = await asyncio.to_thread(find_pg_tool, "pg_dump", major)
        if pg_dump is not None:
            return await self._backup_pg_dump(label, output, pg_dump)
        result = await self._backup_logical(label, output, progress)
        result.note = (
            f"no pg_dump of major version >= {major} on PATH: wrote a verified logical"
            " export (a SQLite file) instead"
        )
        return result

    async def _backup_pg_dump(
        self, label: str, output: str | Path | None, pg_dump: str
    ) -> BackupResult:
        from kotonoha_bot.transfer.verify import table_checksums

        settings = self.settings
        dest, rotate_dir = destination(settings, label, output, ".dump")
        make_dir(dest.parent)
        partial = dest.with_name(dest.name + ".partial")
        partial.unlink(missing_ok=True)
        create_private(partial)  # pg_dump keeps the mode of a file that exists: 0600 from birth
        uri, env = self._libpq()
        async with self._database() as db:
            store = PostgresRows(db, snapshot=True)
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
        make_private(partial)
        manifest_path = Path(str(dest) + MANIFEST_SUFFIX)
        text = json.dumps({"source": display_url(self.url), "tables": manifest}, indent=2)
        await asyncio.to_thread(manifest_path.write_text, text, encoding="utf-8")
        make_private(manifest_path)
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
        self, label: str, output: str | Path | None, progress: TransferProgress | None
    ) -> BackupResult:
        from kotonoha_bot.db.sqlite.rows import finalize_file
        from kotonoha_bot.transfer.copy import migrate

        settings = self.settings
        dest, rotate_dir = destination(settings, label, output, ".db")
        make_dir(dest.parent)
        partial = dest.with_name(dest.name + ".partial")
        quarantine = dest.with_name(dest.name + ".quarantine.jsonl")
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)
        try:
            report = await migrate(
                self.url,
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
        make_private(partial)
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

    # --- restoring pg_dump archives ---------------------------------------------------

    async def check_archive(self, path: Path) -> None:
        """``pg_restore --list`` reads the whole table of contents: a damaged archive fails."""
        major = await self._server_major(require_schema=False)
        pg_restore = await asyncio.to_thread(find_pg_tool, "pg_restore", major)
        if pg_restore is None:
            raise MigrationError(
                f"restoring a pg_dump archive needs pg_restore of major version >= {major}"
                " on PATH; nothing was changed"
            )
        try:
            await _run_tool(
                [pg_restore, "--list", str(path)], dict(os.environ), "pg_restore --list"
            )
        except MigrationError as exc:
            raise MigrationError(
                f"{path} is not a readable pg_dump archive ({exc}); nothing was changed"
            ) from None

    async def restore_archive(self, path: Path, started: float, wiped: bool) -> RestoreResult:
        import time

        from kotonoha_bot.transfer.verify import table_checksums

        major = await self._server_major(require_schema=False)
        pg_restore = await asyncio.to_thread(find_pg_tool, "pg_restore", major)
        if pg_restore is None:
            raise MigrationError(
                f"restoring a pg_dump archive needs pg_restore of major version >= {major} on PATH"
            )
        uri, env = self._libpq()
        # --clean --if-exists replaces the (empty or wiped) kotonoha schema; one
        # transaction, so a failure leaves the database as it was.
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
        async with self._database() as db:
            store = PostgresRows(db, snapshot=True)
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
                    "the restored database differs from the backup's manifest in"
                    f" {', '.join(differ)}"
                )
            rows = sum(int(t["rows"]) for t in restored.values())
            verified = f"{rows} rows: counts and checksums equal the backup's manifest"
        return RestoreResult(
            path,
            display_url(self.url),
            "pg_restore",
            verified,
            time.perf_counter() - started,
            wiped,
        )
