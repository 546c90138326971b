"""Restore and backup under bad backups, --wipe, odd --output paths and shared BACKUP_DIRs.

The operator-level table runs `kotonoha` itself; the library-level cases run every bad
backup into a filled database on both backends (row for row the same afterwards).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.errors import KotonohaError, MigrationError
from kotonoha_bot.transfer.backup import backup_database, restore_backup
from kotonoha_bot.transfer.copy import migrate
from tests.hostile.cases import CASES, Case, corrupt_pages, foreign_sqlite
from tests.hostile.runner import check_case
from tests.transfer.test_transfer import fill, snapshot

AREA = [c for c in CASES if c.area == "restore"]


@pytest.mark.parametrize("case", AREA, ids=[c.slug for c in AREA])
def test_operator_case(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path / "work")


def _truncated(good: Path, bad: Path) -> None:
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])


def _bit_flipped(good: Path, bad: Path) -> None:
    shutil.copy(good, bad)
    corrupt_pages(bad)


def _foreign(good: Path, bad: Path) -> None:
    foreign_sqlite(bad)


def _empty(good: Path, bad: Path) -> None:
    bad.write_bytes(b"")


def _text(good: Path, bad: Path) -> None:
    bad.write_text("not a backup\n", encoding="utf-8")


def _fake_pg_dump(good: Path, bad: Path) -> None:
    bad.write_bytes(b"PGDMP" + b"\x00" * 200)  # the magic, then nothing readable


def safety_copies(where: Path) -> list[Path]:
    return list(where.glob("backups/*-prerestore-*"))


BAD_BACKUPS = {
    "truncated": _truncated,
    "bit-flipped": _bit_flipped,
    "foreign SQLite": _foreign,
    "empty file": _empty,
    "text file": _text,
    "pg_dump magic only": _fake_pg_dump,
}


@pytest.mark.parametrize("make", BAD_BACKUPS.values(), ids=list(BAD_BACKUPS))
async def test_a_bad_backup_never_costs_a_row(
    make: Any, database_url: str, settings: Settings, tmp_path: Path
) -> None:
    await fill(database_url, settings, sessions=4, sources=3)
    before = await snapshot(database_url, settings)
    good = tmp_path / "good.db"
    await fill(f"sqlite:///{good}", settings, sessions=1, sources=1)
    conn = sqlite3.connect(good)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    bad = tmp_path / "bad.db"
    make(good, bad)
    with pytest.raises(KotonohaError) as info:
        await restore_backup(bad, settings, database_url, wipe_first=True)
    assert "\n" not in str(info.value)
    assert await snapshot(database_url, settings) == before
    assert not safety_copies(tmp_path)  # refused before the safety copy was even needed


async def test_wipe_keeps_a_safety_copy_that_restores_in_one_command(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    await fill(database_url, settings, sessions=4, sources=3)
    before = await snapshot(database_url, settings)
    other = tmp_path / "other.db"
    await fill(f"sqlite:///{other}", settings, sessions=1, sources=1)
    result = await restore_backup(other, settings, database_url, wipe_first=True)
    assert result.safety_copy is not None and "-prerestore-" in result.safety_copy.name
    assert await snapshot(database_url, settings) != before
    back = await restore_backup(result.safety_copy, settings, database_url, wipe_first=True)
    assert back.wiped
    assert await snapshot(database_url, settings) == before


async def test_migrate_safety_backups_are_rotated(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    src = await new_database_url("sqlite")
    await fill(src, settings, sessions=2, sources=1)
    keep2 = settings.model_copy(update={"backup_keep": 2})
    for _ in range(4):
        target = await new_database_url("sqlite")
        await migrate(src, target, settings=keep2)
    premigrate = sorted((tmp_path / "backups").glob("*-premigrate-*.db"))
    assert len(premigrate) == 2, premigrate


async def test_backup_output_with_a_trailing_slash_is_a_directory(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    url = await new_database_url("sqlite")
    await fill(url, settings, sessions=1, sources=1)
    first = await backup_database(settings, url, output=f"{tmp_path}/history/")
    second = await backup_database(settings, url, output=f"{tmp_path}/history/")
    assert first.path != second.path and first.path.parent == tmp_path / "history"
    assert first.path.exists() and second.path.exists()
    with pytest.raises(MigrationError, match="already exists"):
        await backup_database(settings, url, output=first.path)
