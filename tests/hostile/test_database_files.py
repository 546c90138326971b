"""Database files that are not what they should be: foreign, legacy, devices, full, read-only,
locked; and the files kotonoha creates are private (0600) under the default umask."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseURL, open_database
from kotonoha_bot.errors import (
    DatabaseLockedError,
    DiskFullError,
    ForeignDatabaseError,
    LegacyDatabaseError,
    MigrationError,
)
from kotonoha_bot.models import EmbeddingConfig, KnowledgeChunk, KnowledgeSource
from kotonoha_bot.transfer.copy import migrate
from tests.hostile.cases import CASES, Case, digest, foreign_sqlite, legacy_sqlite
from tests.hostile.runner import check_case
from tests.transfer.test_transfer import fill, snapshot

AREA = [c for c in CASES if c.area == "files"]


@pytest.mark.parametrize("case", AREA, ids=[c.slug for c in AREA])
def test_operator_case(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path / "work")


def wal_of(path: Path) -> bool:
    return Path(f"{path}-wal").exists()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def default_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def test_files_kotonoha_creates_are_private(
    default_umask: None, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "data" / "kotonoha.db"
    async with open_database(f"sqlite:///{path}", settings=settings) as db:
        await db.set_embedding_config(EmbeddingConfig("m", 3))
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="a", title="a"),
            [KnowledgeChunk("k", "text", 0, np.ones(3, np.float32))],
        )
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert p.exists() and mode(p) == 0o600, (p, oct(mode(p)))
    assert mode(path.parent) == 0o700
    target = tmp_path / "moved" / "target.db"
    await migrate(f"sqlite:///{path}", f"sqlite:///{target}", settings=settings)
    assert mode(target) == 0o600
    for backup in (tmp_path / "backups").glob("*.db"):
        assert mode(backup) == 0o600, backup


@pytest.mark.parametrize("make", [foreign_sqlite, legacy_sqlite], ids=["foreign", "legacy"])
async def test_a_file_that_is_not_ours_is_refused_unchanged(
    make: Any, settings: Settings, tmp_path: Path
) -> None:
    path = make(tmp_path / "other.db")
    before = digest(path)
    expected = LegacyDatabaseError if make is legacy_sqlite else ForeignDatabaseError
    with pytest.raises(expected) as info:
        async with open_database(f"sqlite:///{path}", settings=settings):
            pass
    if expected is LegacyDatabaseError:
        assert "kotonoha db upgrade" in str(info.value)
    assert digest(path) == before and not wal_of(path)
    with pytest.raises(MigrationError):  # nor does a migration write into it
        await migrate(f"sqlite:///{tmp_path / 'none.db'}", f"sqlite:///{path}", settings=settings)
    assert digest(path) == before


async def test_a_long_writer_elsewhere_makes_us_wait_not_fail(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    quick = settings.model_copy(update={"sqlite_busy_timeout_ms": 100})
    async with open_database(url, settings=quick) as db:
        held, release = threading.Event(), threading.Event()

        def other_process_writes() -> None:  # holds the write lock ~4 busy timeouts
            conn = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            held.set()
            release.wait(0.4)
            conn.execute("COMMIT")
            conn.close()

        thread = threading.Thread(target=other_process_writes)
        thread.start()
        held.wait()
        try:
            await db.save_source(KnowledgeSource(guild_id=1, uri="a", title="a"), [])
        finally:
            release.set()
            thread.join()
        assert await db.find_source(1, "a") is not None


async def test_a_writer_that_never_lets_go_is_a_typed_error(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    quick = settings.model_copy(update={"sqlite_busy_timeout_ms": 50})
    async with open_database(url, settings=quick) as db:
        conn = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(DatabaseLockedError, match="locked by another process"):
                await db.save_source(KnowledgeSource(guild_id=1, uri="a", title="a"), [])
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        await db.save_source(KnowledgeSource(guild_id=1, uri="a", title="a"), [])


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("needs permission to mount a tmpfs (a real full disk)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_a_full_disk_is_reported_as_full_and_keeps_committed_rows(
    small_disk: Path, settings: Settings
) -> None:
    url = f"sqlite:///{small_disk / 'k.db'}"
    async with open_database(url, settings=settings) as db:
        await fill(url, settings, sessions=2, sources=1)
        before = (await db.stats()).sessions
        with contextlib.suppress(OSError), (small_disk / "filler").open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        big = [KnowledgeChunk(f"k{i}", "会議の記録 " * 400, i) for i in range(200)]
        with pytest.raises(DiskFullError, match="is full") as info:
            await db.save_source(KnowledgeSource(guild_id=1, uri="big", title="big"), big)
        assert "rollback" not in str(info.value) and "corrupt" not in str(info.value).lower()
        (small_disk / "filler").unlink()
        assert (await db.stats()).sessions == before
        assert await db.find_source(1, "big") is None
    await asyncio.sleep(0)


async def test_a_read_only_postgres_is_reported_as_read_only(
    new_database_url: Any, settings: Settings
) -> None:
    import asyncpg

    from kotonoha_bot.errors import ReadOnlyDatabaseError

    url = await new_database_url("postgres")
    await fill(url, settings, sessions=1, sources=1)
    before = await snapshot(url, settings)
    name = DatabaseURL.parse(url).database

    async def read_only(on: bool) -> None:
        conn = await asyncpg.connect(url)
        try:
            value = "on" if on else "off"
            await conn.execute("SET default_transaction_read_only = off")
            await conn.execute(
                f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}'
            )
        finally:
            await conn.close()

    await read_only(True)
    with pytest.raises(ReadOnlyDatabaseError, match="only accepts reads"):
        async with open_database(url, settings=settings):
            pass
    await read_only(False)
    assert await snapshot(url, settings) == before
