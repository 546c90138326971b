"""Where the dashboard runs: inside `kotonoha run` (DASHBOARD_PORT) and as `kotonoha dashboard`.

The bot runs on SimCord with the real Anthropic SDK against the fake API server; the
command runs as a real subprocess, stopped with SIGTERM like `docker stop` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import simcord

from kotonoha_bot.bot.client import KotonohaBot
from kotonoha_bot.bot.runtime import serve
from kotonoha_bot.errors import ConfigError
from tests.bot.sim import SETTLE_SECONDS
from tests.chat.support import chat_settings
from tests.dashboard.conftest import TOKEN
from tests.fakes.api_server import FakeAPIServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_kotonoha_run_serves_the_dashboard_and_its_pause_silences_the_bot(
    fake_api: FakeAPIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_api.base_url)  # read by the Anthropic SDK
    port = free_port()
    settings = chat_settings(
        tmp_path,
        discord_token="discord-token-never-used",
        health_port=0,
        dashboard_port=port,
        dashboard_token=TOKEN,
    )
    url = f"http://127.0.0.1:{port}"
    seen: dict[str, object] = {}

    async def connect(bot: KotonohaBot, token: str) -> None:
        async with (
            simcord.run(bot, settle_timeout=SETTLE_SECONDS) as env,
            httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            ) as c,
        ):
            user = env.create_user("mina", global_name="ミナ")
            env.create_guild().add_member(user)
            status = (await c.get("/api/status")).json()
            seen["discord"] = status["discord_connected"]  # from the running client itself
            seen["paused_before"] = status["paused"]
            assert (await c.post("/status/pause")).status_code == 303  # bearer: no CSRF
            await user.send_dm("おやすみ")
            seen["paused_replies"] = [m.content for m in user.dm_channel.history() if m.author.bot]
            assert (await c.post("/status/resume")).status_code == 303
            await user.send_dm("おはよう")
            seen["replies"] = [m.content for m in user.dm_channel.history() if m.author.bot]
            anonymous = await httpx.AsyncClient(base_url=url).get("/api/status")
            seen["anonymous"] = anonymous.status_code

    await serve(settings, connect=connect)

    assert seen["discord"] is True and seen["paused_before"] is False
    assert seen["paused_replies"] == []  # paused: no answer
    assert seen["replies"] == ["echo: おはよう"]  # resumed: answers again
    assert seen["anonymous"] == 401
    with pytest.raises(httpx.ConnectError):  # the dashboard stopped with the bot
        async with httpx.AsyncClient() as c:
            await c.get(url + "/login")


async def test_kotonoha_run_refuses_a_dashboard_port_without_a_token(tmp_path: Path) -> None:
    settings = chat_settings(
        tmp_path, discord_token="discord-token-never-used", health_port=0, dashboard_port=0
    )

    async def connect(bot: KotonohaBot, token: str) -> None:
        raise AssertionError("must not connect to Discord")

    with pytest.raises(ConfigError, match="DASHBOARD_TOKEN is not set"):
        await serve(settings, connect=connect)


def _command_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHBOARD_")}
    env.update(
        DATABASE_PATH=str(tmp_path / "kotonoha.db"),
        EMBEDDING_PROVIDER="hashing",
        HEALTH_PORT="0",
        **extra,
    )
    return env


def test_kotonoha_dashboard_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kotonoha_bot", "dashboard"],
        cwd=tmp_path,
        env=_command_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "DASHBOARD_TOKEN is not set" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "kotonoha.db").exists()  # refused before opening anything


async def _serving(proc: asyncio.subprocess.Process) -> tuple[str, list[str]]:
    """Read stderr until the dashboard says where it listens; returns (url, lines)."""
    assert proc.stderr is not None
    lines: list[str] = []
    while True:
        raw = await asyncio.wait_for(proc.stderr.readline(), timeout=120)
        if not raw:
            raise AssertionError("kotonoha dashboard exited: " + "".join(lines))
        line = raw.decode()
        lines.append(line)
        if line.startswith("dashboard: http://"):
            return line.split()[1].removesuffix("/login"), lines


@pytest.mark.parametrize("generated", [False, True], ids=["token", "generated"])
async def test_kotonoha_dashboard_serves_until_sigterm(tmp_path: Path, generated: bool) -> None:
    port = free_port()
    extra = {} if generated else {"DASHBOARD_TOKEN": TOKEN}
    args = ["--generate-token"] if generated else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kotonoha_bot",
        "dashboard",
        "--port",
        str(port),
        *args,
        cwd=tmp_path,
        env=_command_env(tmp_path, LOG_LEVEL="DEBUG", **extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url, lines = await _serving(proc)
        assert url == f"http://127.0.0.1:{port}"  # loopback by default
        token = TOKEN
        if generated:
            (shown,) = [ln for ln in lines if "shown once" in ln]
            token = shown.rsplit(" ", 1)[1].strip()
            assert len(token) >= 16
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            assert (await c.get("/api/status")).status_code == 401
            ok = await c.get("/api/status", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json()["backend"] == "sqlite"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
        assert proc.stderr is not None
        rest = (await proc.stderr.read()).decode()
        assert proc.stdout is not None
        out = (await proc.stdout.read()).decode()
        # The token is shown once at most (the generated one), never logged.
        everything = "".join(lines) + rest + out
        assert everything.count(token) == (1 if generated else 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
