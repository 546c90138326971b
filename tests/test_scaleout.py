"""Two bot processes sharing one PostgreSQL: no duplicated and no lost work.

Each "bot" here is a pair of real `kotonoha` processes started concurrently: two
`kotonoha chat` pipelines writing the same session (optimistic locking, resolved by
reload-and-append), then two `kotonoha kb embed-pending` and two `kotonoha kb archive`
runs at once (pending chunks claimed with FOR UPDATE SKIP LOCKED, sessions archived
under a lease). The embeddings come from the fake OpenAI server on loopback, which
records every text it was asked to embed, so duplicated work is visible.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.db.contract import CAP_MULTI_PROCESS
from kotonoha_bot.models import (
    ChatSession,
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Message,
)
from tests.fakes.api_server import FakeAPIServer, fake_api_fixture, last_user_text

DIM = 64
MODEL = "text-embedding-3-small"


def one_line(body: Any) -> str:
    return "echo: " + " / ".join(last_user_text(body).split("\n\n"))


fake_api = fake_api_fixture(reply=one_line, embedding_dimension=DIM)


def bot_env(fake: FakeAPIServer, url: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("LLM_", "ANTHROPIC_", "OPENAI_", "EMBEDDING_", "DATABASE_"))
    }
    env.update(
        DATABASE_TYPE="postgres",
        DATABASE_URL=url,
        DATABASE_POOL_MIN_SIZE="1",
        DATABASE_POOL_MAX_SIZE="4",
        LLM_PROVIDER="openai",
        LLM_BASE_URL=fake.openai_base_url,
        OPENAI_API_KEY="sk-scaleout-test",
        EMBEDDING_PROVIDER="openai",
        EMBEDDING_BASE_URL=fake.openai_base_url,
        EMBEDDING_MODEL=MODEL,
        EMBEDDING_DIMENSION=str(DIM),
        EMBEDDING_BATCH_SIZE="3",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


async def kotonoha(env: dict[str, str], *args: str, stdin: str = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kotonoha_bot",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def pg_url(new_database_url: Any) -> str:
    return await new_database_url("postgres")  # type: ignore[no-any-return]


async def test_two_bot_processes_share_one_postgres(pg_url: str, fake_api: FakeAPIServer) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    old = datetime.now(UTC) - timedelta(hours=3)
    async with open_database(pg_url, settings=settings) as db:
        assert CAP_MULTI_PROCESS in db.capabilities
        await db.set_embedding_config(EmbeddingConfig(MODEL, DIM))
        # Work for the background jobs: 30 chunks waiting for embeddings ...
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="notes.md", title="notes"),
            [KnowledgeChunk(f"c{i}", f"pending note number {i}", i) for i in range(30)],
        )
        # ... and 6 idle conversations to archive.
        for s in range(6):
            session = ChatSession(
                f"mention:9:{s}",
                "mention",
                guild_id=1,
                channel_id=9,
                user_id=s,
                created_at=old,
                last_active_at=old,
            )
            for i in range(10):
                session.add_message(
                    Message("user", f"session {s} line {i}", old + timedelta(seconds=i), s)
                )
            await db.save_session(session)

    env = bot_env(fake_api, pg_url)
    chat_args = ["chat", "--guild", "1", "--channel", "5", "--user", "42", "--name", "ミナ"]
    lines_a = [f"A{i} からのメッセージ" for i in range(6)]
    lines_b = [f"B{i} からのメッセージ" for i in range(6)]
    results = await asyncio.gather(
        kotonoha(env, *chat_args, stdin="\n".join(lines_a) + "\n"),
        kotonoha(env, *chat_args, stdin="\n".join(lines_b) + "\n"),
    )
    for code, _out, err in results:
        assert code == 0, err

    jobs = await asyncio.gather(
        kotonoha(env, "kb", "embed-pending", "--json"),
        kotonoha(env, "kb", "embed-pending", "--json"),
        kotonoha(env, "kb", "archive", "--idle-minutes", "60", "--json"),
        kotonoha(env, "kb", "archive", "--idle-minutes", "60", "--json"),
    )
    for code, _out, err in jobs:
        assert code == 0, err

    # No lost work: every chat line of both processes is in the one shared session.
    async with open_database(pg_url, settings=settings) as db:
        infos = [i for i in await db.list_sessions() if i.channel_id == 5]
        assert len(infos) == 1
        chat = await db.load_session(infos[0].session_key)
        assert chat is not None
        users = [m.content for m in chat.messages if m.role == "user"]
        assert sorted(users) == sorted(lines_a + lines_b)
        assert len(chat.messages) == 24  # every turn answered, nothing twice
        # Every pending chunk embedded, every idle session archived once.
        stats = await db.stats()
        assert stats.pending_chunks == 0
        windows = 0
        for s in range(6):
            src = await db.find_source(1, f"session:mention:9:{s}")
            assert src is not None and src.source_id is not None
            chunks = await db.list_chunks(src.source_id)
            assert chunks and all(c.embedding is not None for c in chunks)
            assert len({c.chunk_key for c in chunks}) == len(chunks)
            windows += len(chunks)
        notes = await db.find_source(1, "notes.md")
        assert notes is not None and notes.status == "ready"
        vecs = [c.embedding for c in await db.list_chunks(notes.source_id)]  # type: ignore[arg-type]
        assert all(v is not None and np.isfinite(v).all() for v in vecs)

    # No duplicated work: the embedding service saw each pending chunk and each
    # archive window exactly once across both processes.
    embedded = Counter(
        text
        for request in fake_api.requests_for("embeddings")
        for text in (
            request.json["input"]
            if isinstance(request.json["input"], list)
            else [request.json["input"]]
        )
    )
    pending_texts = [f"pending note number {i}" for i in range(30)]
    assert all(embedded[t] == 1 for t in pending_texts), {
        t: embedded[t] for t in pending_texts if embedded[t] != 1
    }
    window_texts = [t for t in embedded if t.startswith("user ") or ": session " in t]
    assert len(window_texts) == windows
    assert all(embedded[t] == 1 for t in window_texts)
