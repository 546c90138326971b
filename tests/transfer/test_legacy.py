"""Databases of the legacy bot (one `sessions` table with a JSON `messages` column).

Real legacy files are built with raw sqlite3 exactly as the old bot laid them out,
with Japanese, emoji, NUL characters and the malformed rows such files really hold;
they are imported into real SQLite and PostgreSQL targets and upgraded in place.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database, sqlite_path_from_url
from kotonoha_bot.db.sqlite.rows import inspect_file
from kotonoha_bot.db.sqlite.schema import LATEST_SCHEMA_VERSION
from kotonoha_bot.errors import ConfigError
from kotonoha_bot.transfer.common import resolve_timezone
from kotonoha_bot.transfer.copy import migrate
from kotonoha_bot.transfer.marker import migration_marker
from kotonoha_bot.transfer.reports import EXIT_QUARANTINED
from kotonoha_bot.transfer.verify import verify
from tests.transfer.test_transfer import files, run_cli

LEGACY_DDL = """
CREATE TABLE sessions (
    session_key TEXT PRIMARY KEY,
    session_type TEXT,
    messages TEXT,
    created_at TEXT,
    last_active_at TEXT,
    channel_id INTEGER,
    thread_id INTEGER,
    user_id INTEGER
)
"""
UID = 123456789012345678
CID = 987654321098765432
TID = 555555555555555555


def msg(role: Any, content: Any, ts: Any = "2024-01-15T09:00:00.123456", **extra: Any) -> Any:
    item = {"role": role, "content": content, "timestamp": ts}
    item.update(extra)
    return item


def make_legacy(path: Path) -> dict[str, Any]:
    """A legacy file; returns what a correct import must give."""
    good: dict[str, Any] = {}
    bad_sessions: dict[str, str] = {}
    bad_messages: dict[str, str] = {}
    rows: list[tuple[Any, ...]] = []

    key = f"mention:{UID}"
    conversation = [
        msg("user", "こんにちは、ことのは！🌸 今日の予定は？"),
        msg("assistant", "15時から会議です 👋\n改行も", "2024-01-15T09:00:05"),
    ]
    rows.append(
        (
            key,
            "mention",
            json.dumps(conversation, ensure_ascii=False),
            "2024-01-15T08:59:00",
            "2024-01-15T09:00:05",
            CID,
            None,
            UID,
        )
    )
    good[key] = {
        "type": "mention",
        "ids": (CID, None, UID),
        "created": datetime(2024, 1, 14, 23, 59, tzinfo=UTC),
        "messages": [
            (
                "user",
                "こんにちは、ことのは！🌸 今日の予定は？",
                datetime(2024, 1, 15, 0, 0, 0, 123456, tzinfo=UTC),
                None,
            ),
            (
                "assistant",
                "15時から会議です 👋\n改行も",
                datetime(2024, 1, 15, 0, 0, 5, tzinfo=UTC),
                None,
            ),
        ],
    }

    # NUL characters: escaped in the JSON and raw inside a string; an id as text.
    key = f"thread:{TID}"
    raw_json = (
        '[{"role": "user", "content": "NUL\\u0000escaped", "timestamp": "2024-02-01T12:00:00",'
        ' "author_id": "123"},'
        ' {"role": "assistant", "content": "raw\x00nul 🐈", "timestamp": "2024-02-01T12:00:01"}]'
    )
    rows.append(
        (key, "thread", raw_json, "2024-02-01T12:00:00", "2024-02-01T12:00:01", CID, TID, None)
    )
    good[key] = {
        "type": "thread",
        "ids": (CID, TID, None),
        "created": datetime(2024, 2, 1, 3, 0, tzinfo=UTC),
        "messages": [
            ("user", "NUL\ufffdescaped", datetime(2024, 2, 1, 3, 0, tzinfo=UTC), 123),
            ("assistant", "raw\ufffdnul 🐈", datetime(2024, 2, 1, 3, 0, 1, tzinfo=UTC), None),
        ],
    }

    # No session_type (taken from the key) and no created_at (taken from the messages);
    # one unknown role, one non-object and one timestamp-less message are set aside;
    # an unknown field is reported.
    key = f"eavesdrop:{CID}"
    items = [
        msg("user", "みんな元気？", "2024-03-01T10:00:00", attachments=["a.png"]),
        msg("tool", "not a chat role"),
        "just a string",
        {"role": "user", "content": "no time"},
        msg("assistant", "元気です！", "2024-03-01T10:00:02"),
    ]
    rows.append((key, None, json.dumps(items, ensure_ascii=False), None, None, CID, None, None))
    good[key] = {
        "type": "eavesdrop",
        "ids": (CID, None, None),
        "created": datetime(2024, 3, 1, 1, 0, tzinfo=UTC),
        "messages": [
            ("user", "みんな元気？", datetime(2024, 3, 1, 1, 0, tzinfo=UTC), None),
            ("assistant", "元気です！", datetime(2024, 3, 1, 1, 0, 2, tzinfo=UTC), None),
        ],
    }
    bad_messages[f"{key}#1"] = "role: unknown value 'tool'"
    bad_messages[f"{key}#2"] = "message is a JSON str, not an object"
    bad_messages[f"{key}#3"] = "timestamp: missing"

    # An empty conversation is fine; messages stored as a BLOB are decoded.
    key = f"dm:{CID}"
    rows.append((key, "dm", "[]", "2024-04-01T00:00:00", "2024-04-01T00:00:00", CID, None, UID))
    good[key] = {
        "type": "dm",
        "ids": (CID, None, UID),
        "created": datetime(2024, 3, 31, 15, 0, tzinfo=UTC),
        "messages": [],
    }
    key = f"dm:{CID + 1}"
    blob = sqlite3.Binary(json.dumps([msg("user", "BLOB でも 😀")], ensure_ascii=False).encode())
    rows.append((key, "dm", blob, "2024-04-02T00:00:00", "2024-04-02T00:00:00", CID + 1, None, UID))
    good[key] = {
        "type": "dm",
        "ids": (CID + 1, None, UID),
        "created": datetime(2024, 4, 1, 15, 0, tzinfo=UTC),
        "messages": [
            ("user", "BLOB でも 😀", datetime(2024, 1, 15, 0, 0, 0, 123456, tzinfo=UTC), None)
        ],
    }

    # Rows that cannot be imported.
    t = "2024-05-01T00:00:00"
    rows.append(
        (f"mention:{UID + 1}", "mention", '[{"role": "user", "content": "cut', t, t, 1, None, 2)
    )
    bad_sessions[f"mention:{UID + 1}"] = "messages: malformed JSON"
    rows.append((f"group:{CID}", "group", "[]", t, t, CID, None, None))
    bad_sessions[f"group:{CID}"] = "session_type: unknown value 'group'"
    rows.append((f"mention:{UID + 2}", "mention", '{"role": "user"}', t, t, 1, None, 2))
    bad_sessions[f"mention:{UID + 2}"] = "JSON dict where an array is required"
    rows.append((f"mention:{UID + 3}", "mention", None, t, t, 1, None, 2))
    bad_sessions[f"mention:{UID + 3}"] = "messages: NULL in a required column"
    rows.append((f"mention:{UID + 4}", "mention", "[]", "last tuesday", t, 1, None, 2))
    bad_sessions[f"mention:{UID + 4}"] = "created_at: 'last tuesday' is not an ISO 8601 time"
    rows.append((f"mention:{UID + 5}", "mention", "[]", t, t, "channel-7", None, 2))
    bad_sessions[f"mention:{UID + 5}"] = "channel_id: 'channel-7' is not an integer"

    conn = sqlite3.connect(path)
    conn.execute(LEGACY_DDL)
    conn.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    # A key that is not UTF-8 at all.
    conn.execute(
        "INSERT INTO sessions VALUES (CAST(x'6d656e74696f6e3aff' AS TEXT), 'mention', '[]',"
        " ?, ?, 1, NULL, 2)",
        (t, t),
    )
    conn.commit()
    conn.close()
    bad_sessions["{'invalid_utf8_hex': '6d656e74696f6e3aff'}"] = "session_key: invalid UTF-8"
    return {"good": good, "bad_sessions": bad_sessions, "bad_messages": bad_messages}


async def check_imported(url: str, settings: Settings, expected: dict[str, Any]) -> None:
    async with open_database(url, settings=settings) as db:
        infos = await db.list_sessions()
        assert {i.session_key for i in infos} == set(expected["good"])
        for key, want in expected["good"].items():
            s = await db.load_session(key)
            assert s is not None, key
            assert s.session_type == want["type"]
            assert (s.channel_id, s.thread_id, s.user_id) == want["ids"]
            assert s.guild_id is None and s.status == "active" and s.version == 1
            assert s.created_at == want["created"], key
            got = [(m.role, m.content, m.timestamp, m.author_id) for m in s.messages]
            assert got == want["messages"], key
        # Legacy sessions stay usable: the bot can append to them.
        s = await db.load_session(f"mention:{UID}")
        assert s is not None
        s.add_message(s.messages[0])
        await db.save_session(s)


def check_quarantine(path: Path, expected: dict[str, Any]) -> None:
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    sessions = {str(e["key"]): e for e in entries if e["table"] == "sessions"}
    messages = {str(e["key"]): e for e in entries if e["table"] == "messages"}
    assert sessions.keys() == expected["bad_sessions"].keys()
    assert messages.keys() == expected["bad_messages"].keys()
    for key, reason in [*expected["bad_sessions"].items(), *expected["bad_messages"].items()]:
        entry = sessions.get(key) or messages[key]
        assert reason in entry["reason"], (key, entry["reason"])
    # The malformed row is kept whole, so it can be repaired by hand.
    cut = sessions[f"mention:{UID + 1}"]
    assert cut["row"]["messages"] == '[{"role": "user", "content": "cut'


@pytest.mark.parametrize("target_kind", ["postgres", "sqlite"])
async def test_legacy_database_imports_good_rows_and_quarantines_bad_ones(
    target_kind: str, new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    legacy = tmp_path / "legacy.db"
    expected = make_legacy(legacy)
    target = await new_database_url(target_kind)
    report = await migrate(
        f"sqlite:///{legacy}", target, settings=settings, source_timezone="Asia/Tokyo"
    )
    assert report.source_kind == "legacy"
    assert report.exit_code == EXIT_QUARANTINED
    assert report.verify is not None and report.verify.identical
    n_bad = len(expected["bad_sessions"]) + len(expected["bad_messages"])
    assert report.quarantined == n_bad
    assert report.quarantine_path is not None
    check_quarantine(report.quarantine_path, expected)
    assert report.tables["sessions"].moved == len(expected["good"])
    assert report.tables["messages"].moved == 7
    # Rows set aside while converting are counted against their tables.
    assert report.tables["sessions"].quarantined == len(expected["bad_sessions"])
    assert report.tables["messages"].quarantined == len(expected["bad_messages"])
    assert report.tables["messages"].legacy_rows == 7 + len(expected["bad_messages"])
    dry = await migrate(
        f"sqlite:///{legacy}",
        await new_database_url(target_kind),
        settings=settings,
        source_timezone="Asia/Tokyo",
        dry_run=True,
    )
    assert {t: (r.moved, r.quarantined) for t, r in dry.tables.items()} == {
        t: (r.moved, r.quarantined) for t, r in report.tables.items()
    }
    assert report.conversions["nul_replaced"] == 2
    assert report.conversions["int_from_text"] == 1
    assert report.conversions["type_from_key"] == 1
    assert report.conversions["time_from_messages"] == 2
    assert report.conversions["text_from_blob"] == 1
    assert any("attachments (1x)" in w for w in report.warnings)
    assert report.legacy == {
        "sessions_read": len(expected["good"]) + len(expected["bad_sessions"]),
        "sessions": len(expected["good"]),
        "messages": 7,
        "quarantined_sessions": len(expected["bad_sessions"]),
        "quarantined_messages": len(expected["bad_messages"]),
    }
    # The legacy file itself is untouched, its backup is a legacy file too.
    assert inspect_file(legacy).kind == "legacy"
    assert report.backup_path is not None and inspect_file(report.backup_path).kind == "legacy"
    await check_imported(target, settings, expected)

    # verify on its own converts the legacy file the same way.
    again = await verify(
        f"sqlite:///{legacy}", target, settings=settings, source_timezone="Asia/Tokyo"
    )
    # (check_imported appended one message; everything else is identical.)
    assert not again.identical
    assert again.tables["messages"].extra_count == 1
    assert [t for t, d in again.tables.items() if not d.identical] == ["sessions", "messages"]
    assert again.tables["sessions"].differing == [
        {"key": f"mention:{UID}", "columns": ["version", "message_count"]}
    ]
    assert again.tables["sessions"].source_quarantined == len(expected["bad_sessions"])
    assert again.tables["messages"].source_quarantined == len(expected["bad_messages"])


async def test_legacy_import_resumes_with_the_same_ids(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    """Converting a legacy file is deterministic, so an interrupted import resumes."""
    import asyncpg

    legacy = tmp_path / "legacy.db"
    make_legacy(legacy)
    target = await new_database_url("postgres")
    url = f"sqlite:///{legacy}"
    await migrate(url, target, settings=settings, source_timezone="Asia/Tokyo")
    c = await asyncpg.connect(target)
    try:  # as if killed after the sessions and the first messages
        await c.execute("DELETE FROM messages WHERE id > 3")
        await c.execute(
            "INSERT INTO kotonoha_meta VALUES ('migration_in_progress', $1)",
            json.dumps({"source": f"sqlite:///{legacy.resolve()}"}),
        )
    finally:
        await c.close()
    assert await migration_marker(target, settings) is not None
    report = await migrate(url, target, settings=settings, source_timezone="Asia/Tokyo")
    assert report.mode == "resume"
    assert report.tables["messages"].already_present == 3
    assert report.tables["messages"].moved == 4
    assert report.verify is not None and report.verify.identical
    assert await migration_marker(target, settings) is None


async def test_naive_times_follow_the_source_timezone(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    legacy = tmp_path / "legacy.db"
    make_legacy(legacy)
    utc = await new_database_url("sqlite")
    await migrate(f"sqlite:///{legacy}", utc, settings=settings, source_timezone="UTC")
    async with open_database(utc, settings=settings) as db:
        s = await db.load_session(f"mention:{UID}")
        assert s is not None
        assert s.created_at == datetime(2024, 1, 15, 8, 59, tzinfo=UTC)
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        resolve_timezone("Mars/Olympus")
    zone, label = resolve_timezone(None)
    assert zone is not None and label


async def test_upgrade_in_place_after_a_backup(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    legacy = tmp_path / "data" / "kotonoha.db"
    legacy.parent.mkdir()
    expected = make_legacy(legacy)
    url = f"sqlite:///{legacy}"
    done = run_cli(
        "db", "upgrade", "--database", url, "--source-timezone", "Asia/Tokyo", cwd=tmp_path
    )
    assert done.returncode == EXIT_QUARANTINED, done.stderr
    assert "backup of the legacy file" in done.stderr and "verified" in done.stderr
    info = inspect_file(legacy)
    assert info.kind == "current" and info.schema_version == LATEST_SCHEMA_VERSION
    assert "kotonoha_legacy_sessions" not in info.tables
    backups = files("backups/kotonoha-legacy-*.db", tmp_path)
    assert len(backups) == 1 and inspect_file(backups[0]).kind == "legacy"
    quarantine = files("backups/kotonoha-quarantine-*.jsonl", tmp_path)
    assert len(quarantine) == 1
    check_quarantine(quarantine[0], expected)
    conn = sqlite3.connect(legacy)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    await check_imported(url, settings, expected)

    # The upgraded file is an ordinary current database: it migrates cleanly.
    target = await new_database_url("postgres")
    report = await migrate(url, target, settings=settings)
    assert report.exit_code == 0 and report.verify is not None and report.verify.identical

    again = run_cli("db", "upgrade", "--database", url, cwd=tmp_path)
    assert again.returncode == 0 and "already has the current schema" in again.stderr


async def test_not_a_kotonoha_database(settings: Settings, tmp_path: Path) -> None:
    from kotonoha_bot.errors import MigrationError

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.close()
    with pytest.raises(MigrationError, match=r"not a kotonoha database \(tables: notes\)"):
        await migrate(f"sqlite:///{other}", f"sqlite:///{tmp_path / 't.db'}", settings=settings)
    assert not (tmp_path / "t.db").exists()
    assert sqlite_path_from_url(f"sqlite:///{other}") == other
