"""`kotonoha run`: settings check, startup, shutdown; background jobs; data retention."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from datetime import timedelta
from pathlib import Path

import aiohttp
import discord
import pytest
import simcord
from typer.testing import CliRunner

from kotonoha_bot.bot.background import Periodic
from kotonoha_bot.bot.client import KotonohaBot, intents_for
from kotonoha_bot.bot.runtime import missing_run_settings, serve
from kotonoha_bot.chat import Conversation, Incoming
from kotonoha_bot.chat.retention import GuildRetention
from kotonoha_bot.cli import app
from kotonoha_bot.config import Settings, sqlite_url
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.errors import ConfigError, DatabaseError
from kotonoha_bot.models import utcnow
from tests.bot.sim import SETTLE_SECONDS
from tests.chat.support import API_KEY, add_document, chat_service, chat_settings
from tests.fakes.api_server import FakeAPIServer, fake_api_fixture

fake_api = fake_api_fixture()

_SECRET_ENV = (
    "DISCORD_TOKEN",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "LLM_BASE_URL",
    "LLM_PROVIDER",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env from the repository
    for name in _SECRET_ENV:
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_lists_every_missing_setting_at_once(clean_env: None) -> None:
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "DISCORD_TOKEN" in out and "ANTHROPIC_API_KEY" in out
    assert "Traceback" not in result.output


def test_run_names_the_key_of_the_chosen_provider(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_PROVIDER", "openai")
    monkeypatch.setenv("DISCORD_TOKEN", "x" * 30)
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "OPENAI_API_KEY" in out and "DISCORD_TOKEN" not in out.split("settings")[1]
    assert "x" * 30 not in result.output


def test_missing_run_settings() -> None:
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    assert missing_run_settings(base) == ["DISCORD_TOKEN", "ANTHROPIC_API_KEY"]
    ready = Settings(_env_file=None, discord_token="t", anthropic_api_key="k")  # type: ignore[call-arg]
    assert missing_run_settings(ready) == []
    local = Settings(  # type: ignore[call-arg]
        _env_file=None, discord_token="t", llm_provider="openai", llm_base_url="http://x/v1"
    )
    assert missing_run_settings(local) == []


def test_intents_follow_the_setting() -> None:
    on = intents_for(Settings(_env_file=None))  # type: ignore[call-arg]
    off = intents_for(Settings(_env_file=None, discord_message_content=False))  # type: ignore[call-arg]
    assert on.message_content and not off.message_content
    assert on.guilds and on.guild_messages and on.dm_messages


async def test_serve_starts_everything_answers_and_saves_on_shutdown(
    fake_api: FakeAPIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_api.base_url)  # read by the Anthropic SDK
    port = free_port()
    settings = chat_settings(
        tmp_path,
        discord_token="discord-token-never-used",
        health_host="127.0.0.1",
        health_port=port,
        session_sync_interval=3600,  # batch mode: the shutdown must save the turn
    )
    seen: dict[str, object] = {}

    async def connect(bot: KotonohaBot, token: str) -> None:
        assert token == "discord-token-never-used"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/ready") as resp,
        ):
            seen["ready_status"] = resp.status
            seen["ready"] = await resp.json()
        # Discord itself is SimCord: the real gateway parsing, cache and HTTP layer.
        async with simcord.run(bot, settle_timeout=SETTLE_SECONDS) as env:
            user = env.create_user("mina", global_name="ミナ")
            env.create_guild().add_member(user)
            await user.send_dm("おやすみ")
            seen["replies"] = [m.content for m in user.dm_channel.history() if m.author.bot]
            seen["dm"] = user.dm_channel.id
            seen["unsaved"] = bot.chat.sessions.unsaved_count()
            seen["jobs"] = bot.jobs
            seen["commands"] = {c.name for c in bot.tree.get_commands()}
            seen["running"] = all(job.running for job in bot.jobs)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/ready") as resp,
            ):
                seen["connected_status"] = resp.status

    await serve(settings, connect=connect)

    assert seen["ready_status"] == 503  # not connected to Discord yet
    assert seen["connected_status"] == 200  # connected (to the simulated Discord)
    ready = seen["ready"]
    assert isinstance(ready, dict)
    assert ready["database"]["reachable"] is True and ready["discord_connected"] is False
    assert seen["replies"] == ["echo: おやすみ"]
    assert seen["commands"] == {"chat", "kb", "memory", "kotonoha"} and seen["running"]
    assert seen["unsaved"] == 2  # batch mode held the turn in memory...
    async with open_database(sqlite_url(tmp_path / "kotonoha.db"), settings=settings) as db:
        stored = await db.load_session(f"dm:{seen['dm']}")
    assert stored is not None and [m.content for m in stored.messages] == [  # ...until shutdown
        "おやすみ",
        "echo: おやすみ",
    ]
    jobs = seen["jobs"]
    assert isinstance(jobs, list) and not any(job.running for job in jobs)
    with pytest.raises(aiohttp.ClientConnectionError):  # the health server stopped
        async with aiohttp.ClientSession() as http:
            await http.get(f"http://127.0.0.1:{port}/health")


async def test_sigterm_closes_the_bot_and_saves(
    fake_api: FakeAPIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_api.base_url)
    settings = chat_settings(
        tmp_path, discord_token="t" * 20, health_port=0, session_sync_interval=3600
    )
    before = signal.getsignal(signal.SIGTERM)
    seen: dict[str, int] = {}

    async def connect(bot: KotonohaBot, token: str) -> None:
        # Like bot.start(): run until the client is closed.
        handler = signal.getsignal(signal.SIGTERM)
        assert getattr(handler, "__name__", "") == "_sighandler_noop", "handler not installed"
        async with simcord.run(bot, settle_timeout=SETTLE_SECONDS) as env:
            user = env.create_user("mina", global_name="ミナ")
            env.create_guild().add_member(user)
            await user.send_dm("またね")
            seen["dm"] = user.dm_channel.id
            assert bot.chat.sessions.unsaved_count() == 2
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(500):
                if bot.is_closed():
                    return
                await asyncio.sleep(0.01)
        raise AssertionError("SIGTERM did not close the bot")

    await serve(settings, connect=connect)
    assert signal.getsignal(signal.SIGTERM) == before
    async with open_database(sqlite_url(tmp_path / "kotonoha.db"), settings=settings) as db:
        stored = await db.load_session(f"dm:{seen['dm']}")
    assert stored is not None and len(stored.messages) == 2


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (discord.LoginFailure("Improper token has been passed."), "DISCORD_TOKEN"),
        (discord.PrivilegedIntentsRequired(None), "DISCORD_MESSAGE_CONTENT=false"),
    ],
)
async def test_discord_refusals_become_clear_config_errors(
    fake_api: FakeAPIServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    expected: str,
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_api.base_url)
    settings = chat_settings(tmp_path, discord_token="secret-discord-token", health_port=0)

    async def connect(bot: KotonohaBot, token: str) -> None:
        raise error

    with pytest.raises(ConfigError) as info:
        await serve(settings, connect=connect)
    assert expected in str(info.value)
    assert "secret-discord-token" not in str(info.value) and API_KEY not in str(info.value)


async def test_periodic_job_survives_failures() -> None:
    calls: list[int] = []

    async def job() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise DatabaseError("database is locked")
        if len(calls) == 2:
            raise RuntimeError("a bug")

    periodic = Periodic("test job", 0.01, job, first_delay=0)
    periodic.start()
    for _ in range(200):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.01)
    await periodic.stop()
    assert len(calls) >= 3 and periodic.failures == 2 and not periodic.running


async def test_retention_forgets_only_guilds_gone_long_enough(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    now = [utcnow()]
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as service:
        for guild in (1, 2, 3):
            await service.respond(
                Conversation.mention(guild, guild * 10, 7), [Incoming("hello", 7, "ミナ")]
            )
        await add_document(service, 2, "two.md", "# two\nguild two")
        await service.respond(Conversation.dm(99, 7), [Incoming("dm", 7, "ミナ")])

    retention = GuildRetention(db, days=30, clock=lambda: now[0])
    assert await retention.sweep({1, 2, 3}) == {}
    retention.note_left(2)  # on_guild_remove
    now[0] += timedelta(days=10)
    assert await retention.sweep({1, 3}) == {}  # guild 3 left? no: still a member
    assert set(retention.pending()) == {2}
    now[0] += timedelta(days=21)
    deleted = await retention.sweep({1})  # guild 3 is gone now too: its clock starts
    assert set(deleted) == {2}
    assert deleted[2].sessions == 1 and deleted[2].sources == 1
    assert await db.load_session("mention:20:7") is None
    assert await db.list_sources(guild_id=2) == []
    assert await db.load_session("mention:10:7") is not None
    assert await db.load_session("mention:30:7") is not None
    assert await db.load_session("dm:99") is not None
    assert set(retention.pending()) == {3}
    retention.note_joined(3)  # the bot came back
    now[0] += timedelta(days=60)
    assert await retention.sweep({1, 3}) == {}

    off = GuildRetention(db, days=0)
    assert not off.enabled and await off.sweep(set()) == {}
    assert await db.load_session("mention:10:7") is not None


async def test_backup_job_backs_up_the_configured_database(
    fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    settings = chat_settings(tmp_path, backup_dir=tmp_path / "backups", backup_interval_hours=24)
    async with (
        open_database(settings.database_location(), settings=settings) as db,
        chat_service(db, fake_api, settings) as service,
    ):
        await service.respond(Conversation.dm(3, 7), [Incoming("バックアップしてね", 7, "ミナ")])
        bot = KotonohaBot(service, settings, sync_commands=False)
        job = next(j for j in bot.jobs if j.name == "database backup")
        assert job.interval == 24 * 3600 and job.first_delay == 600
        path = await bot.backup()
    assert path.parent == tmp_path / "backups" and path.stat().st_size > 0
    async with open_database(sqlite_url(path), settings=settings) as copy:
        stored = await copy.load_session("dm:3")
    assert stored is not None and stored.messages[0].content == "バックアップしてね"

    off = chat_settings(tmp_path, backup_interval_hours=0)
    async with (
        open_database(off.database_location(), settings=off) as db,
        chat_service(db, fake_api, off) as service,
    ):
        names = [j.name for j in KotonohaBot(service, off, sync_commands=False).jobs]
    assert "database backup" not in names and "archive idle sessions" in names


async def test_run_refuses_a_half_migrated_database(tmp_path: Path) -> None:
    import sqlite3

    from kotonoha_bot.transfer.marker import MIGRATION_MARKER

    db_path = tmp_path / "half.db"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_path=db_path,
        discord_token="discord-token-never-used",
        anthropic_api_key="sk-unused",
        health_port=0,
    )
    async with open_database(settings):
        pass
    with sqlite3.connect(db_path) as conn:  # what an interrupted `db migrate` leaves
        conn.execute(
            "INSERT INTO kotonoha_meta (key, value) VALUES (?, ?)",
            (MIGRATION_MARKER, '{"source": "sqlite:///old.db"}'),
        )

    async def connect(bot: KotonohaBot, token: str) -> None:
        raise AssertionError("the bot must not start on a half-migrated database")

    with pytest.raises(ConfigError, match="unfinished"):
        await serve(settings, connect=connect)
