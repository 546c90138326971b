"""`kotonoha chat` in a subprocess: piped stdin, memory across restarts, SIGKILL safety.

The subprocess reaches the fake API through the real Anthropic SDK: the SDK reads
``ANTHROPIC_BASE_URL`` (the settings have no field for the Anthropic endpoint).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from kotonoha_bot.chat import Conversation
from kotonoha_bot.config import Settings, sqlite_url
from kotonoha_bot.db import open_database
from tests.chat.support import API_KEY, sent_turns
from tests.fakes.api_server import FakeAPIServer, Reply, fake_api_fixture, last_user_text


def one_line_echo(body: Any) -> str:
    """The default echo on one line (the tests read replies line by line)."""
    return "echo: " + " / ".join(last_user_text(body).split("\n\n"))


fake_api = fake_api_fixture(reply=one_line_echo)

GUILD, CHANNEL, USER = 7, 70, 700
CONV = Conversation.mention(GUILD, CHANNEL, USER)
ARGS = ["--guild", str(GUILD), "--channel", str(CHANNEL), "--user", str(USER), "--name", "ミナ"]
READ_TIMEOUT = 60.0


def chat_env(fake: FakeAPIServer, db_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("LLM_", "ANTHROPIC_", "OPENAI_", "EMBEDDING_", "DATABASE_"))
    }
    env.update(
        LLM_PROVIDER="anthropic",
        ANTHROPIC_API_KEY=API_KEY,
        ANTHROPIC_BASE_URL=fake.base_url,
        LLM_MAX_RETRIES="0",
        DATABASE_TYPE="sqlite",
        DATABASE_PATH=str(db_path),
        EMBEDDING_PROVIDER="hashing",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


async def start_chat(fake: FakeAPIServer, tmp_path: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kotonoha_bot",
        "chat",
        *ARGS,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=chat_env(fake, tmp_path / "chat.db"),
        cwd=tmp_path,
    )


async def say(proc: asyncio.subprocess.Process, text: str) -> str:
    """Send one line and wait for the reply line (the acknowledgement)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{text}\n".encode())
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readline(), READ_TIMEOUT)
    if not line:
        assert proc.stderr is not None
        err = await proc.stderr.read()
        raise AssertionError(f"kotonoha chat exited: {err.decode(errors='replace')}")
    return line.decode().rstrip("\n")


async def stored_texts(db_path: Path) -> list[str]:
    settings = Settings(_env_file=None, database_path=db_path)  # type: ignore[call-arg]
    async with open_database(sqlite_url(db_path), settings=settings) as db:
        session = await db.load_session(CONV.session_key)
    return [m.content for m in session.messages] if session else []


async def test_chat_answers_piped_stdin_and_remembers_across_runs(
    fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    env = chat_env(fake_api, tmp_path / "chat.db")
    first = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kotonoha_bot", "chat", *ARGS,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    out, err = await asyncio.wait_for(
        first.communicate("わたしの好きな花はすずらんです\n\n".encode()), READ_TIMEOUT
    )
    assert first.returncode == 0, err.decode()
    assert out.decode() == "echo: わたしの好きな花はすずらんです\n"

    second = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kotonoha_bot", "chat", *ARGS,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    out, err = await asyncio.wait_for(
        second.communicate("わたしの好きな花は？\n/quit\nnever sent\n".encode()), READ_TIMEOUT
    )
    assert second.returncode == 0, err.decode()
    assert out.decode() == "echo: わたしの好きな花は？\n"
    # The second run sent the first run's conversation to the model.
    assert sent_turns(fake_api.last("messages").json) == [
        ("user", "わたしの好きな花はすずらんです"),
        ("assistant", "echo: わたしの好きな花はすずらんです"),
        ("user", "わたしの好きな花は？"),
    ]
    assert API_KEY not in err.decode()


async def test_a_long_chat_recalls_its_first_turns_through_retrieval(
    fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    """More turns than HISTORY_TOKEN_BUDGET holds: the first ones come back as knowledge."""
    env = chat_env(fake_api, tmp_path / "chat.db")
    del env["EMBEDDING_PROVIDER"]  # the default: e5 offline when installed, else hashing
    env["HISTORY_TOKEN_BUDGET"] = "100"
    filler = [
        "今日は駅前の本屋で新しい料理の本を買いました",
        "週末は雨の予報なので家でパズルをするつもりです",
        "最近はギターの練習を毎晩三十分ずつしています",
        "昨日の夕飯はカレーで、少し辛すぎました",
        "来月は友だちと山登りに行く計画を立てています",
        "職場の近くに新しいパン屋ができて毎朝寄っています",
        "冬のコートを買い替えようか迷っています",
        "図書館で借りた推理小説がとても面白かったです",
    ]
    lines = ["うちの猫の名前はミルクで、白くてよく寝ます", *filler, "うちの猫の名前、覚えてる？"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kotonoha_bot", "chat", *ARGS,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    out, err = await asyncio.wait_for(
        proc.communicate(("\n".join(lines) + "\n").encode()), READ_TIMEOUT * 4
    )
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("echo: うちの猫の名前はミルク")
    turns = sent_turns(fake_api.last("messages").json)
    history, asked = turns[:-1], turns[-1][1]
    assert not any("ミルク" in text for _role, text in history)  # out of the window ...
    assert "<reference" in asked and "ミルク" in asked  # ... but found as memory


async def test_chat_reports_missing_llm_settings(fake_api: FakeAPIServer, tmp_path: Path) -> None:
    env = chat_env(fake_api, tmp_path / "chat.db")
    del env["ANTHROPIC_API_KEY"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kotonoha_bot", "chat",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), READ_TIMEOUT)
    assert proc.returncode == 2
    assert "ANTHROPIC_API_KEY" in err.decode() and "Traceback" not in err.decode()


@pytest.mark.slow
async def test_sigkill_never_loses_an_acknowledged_message(
    fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    """Kill -9 between turns and in the middle of one; every reply printed is stored."""
    acknowledged: list[str] = []

    # Run 1: three turns, then SIGKILL right after the third reply was printed.
    proc = await start_chat(fake_api, tmp_path)
    for i in range(3):
        text = f"run1 message {i}"
        reply = await say(proc, text)
        assert reply == f"echo: {text}"
        acknowledged += [text, reply]
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    assert await stored_texts(tmp_path / "chat.db") == acknowledged

    # Run 2: one turn, then SIGKILL while the model is still "thinking" on the next.
    proc = await start_chat(fake_api, tmp_path)
    reply = await say(proc, "run2 message 0")
    acknowledged += ["run2 message 0", reply]
    fake_api.script("messages", [Reply(delay=30.0)])
    before = len(fake_api.requests_for("messages"))
    assert proc.stdin is not None
    proc.stdin.write(b"run2 unanswered\n")
    await proc.stdin.drain()
    for _ in range(600):
        if len(fake_api.requests_for("messages")) > before:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the in-flight turn never reached the model")
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    fake_api.reset()

    # Run 3: everything acknowledged is there, in order, and reaches the model again.
    stored = await stored_texts(tmp_path / "chat.db")
    assert stored[: len(acknowledged)] == acknowledged
    # The user's unanswered words were stored before the model was asked.
    assert stored[len(acknowledged) :] == ["run2 unanswered"]
    proc = await start_chat(fake_api, tmp_path)
    reply = await say(proc, "run3 message")
    # The unanswered message and the new one reach the model as one user turn.
    assert reply == "echo: run2 unanswered / run3 message"
    assert proc.stdin is not None
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), READ_TIMEOUT) == 0
    sent = "\n".join(text for _, text in sent_turns(fake_api.last("messages").json))
    for text in acknowledged:
        assert text in sent
    assert await stored_texts(tmp_path / "chat.db") == [
        *acknowledged,
        "run2 unanswered",
        "run3 message",
        reply,
    ]
