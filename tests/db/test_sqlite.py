"""What only the SQLite backend has: an in-memory vector cache that follows the file.

The cache (``db/sqlite/vector_cache.py``, unit tests in ``test_vector_cache.py``) is
loaded once and updated after each commit of this process; a write by another process
(a second bot, ``kotonoha kb ingest`` beside a running bot) is seen through ``PRAGMA
data_version`` and the cache is reloaded before the next search. These tests write
from a real second process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db.sqlite.database import SQLiteDatabase
from kotonoha_bot.errors import DimensionMismatchError
from kotonoha_bot.models import EmbeddingConfig, KnowledgeChunk, KnowledgeSource

REPO = Path(__file__).resolve().parents[2]
DIM = 8


def other_process(db_path: Path, code: str) -> None:
    """Run ``code`` (with ``db`` open on the file) in a separate Python process."""
    script = (
        "import asyncio, numpy as np\n"
        "from kotonoha_bot.config import Settings\n"
        "from kotonoha_bot.db.sqlite.database import SQLiteDatabase\n"
        "from kotonoha_bot.models import KnowledgeChunk, KnowledgeSource\n"
        "async def main():\n"
        f"    async with SQLiteDatabase('sqlite:///{db_path}',"
        " settings=Settings(_env_file=None)) as db:\n"
        + "".join(f"        {line}\n" for line in code.strip().splitlines())
        + "asyncio.run(main())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


async def test_a_search_sees_what_another_process_wrote_and_deleted(
    tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "shared.db"
    async with SQLiteDatabase(f"sqlite:///{path}", settings=settings) as db:
        await db.set_embedding_config(EmbeddingConfig("t", DIM))
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="mine", title="Mine"),
            [KnowledgeChunk("m0", "mine", embedding=unit(0))],
        )
        # The cache is loaded now, holding only this process's chunk.
        assert [h.content for h in await db.similarity_search(unit(1), guild_id=1)] == ["mine"]

        other_process(
            path,
            "await db.save_source(KnowledgeSource(guild_id=1, uri='theirs', title='T'),"
            " [KnowledgeChunk('t0', 'theirs', embedding=np.eye(8, dtype=np.float32)[1])])",
        )
        hits = await db.similarity_search(unit(1), guild_id=1)
        assert [h.content for h in hits] == ["theirs", "mine"]
        assert abs(hits[0].score - 1.0) < 1e-6

        other_process(
            path,
            "src = await db.find_source(1, 'theirs')\nawait db.delete_source(src.source_id)",
        )
        assert [h.content for h in await db.similarity_search(unit(1), guild_id=1)] == ["mine"]


async def test_a_model_switched_by_another_process_is_followed(
    tmp_path: Path, settings: Settings
) -> None:
    """Another process finished a re-embed to 4 dimensions: this one's cache follows."""
    path = tmp_path / "switch.db"
    async with SQLiteDatabase(f"sqlite:///{path}", settings=settings) as db:
        await db.set_embedding_config(EmbeddingConfig("old", DIM))
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="s", title="S"),
            [KnowledgeChunk(f"k{i}", f"text {i}", embedding=unit(i)) for i in range(3)],
        )
        assert (await db.similarity_search(unit(2), guild_id=1))[0].content == "text 2"
        other_process(
            path,
            "from kotonoha_bot.models import EmbeddingConfig\n"
            "await db.begin_reembed(EmbeddingConfig('new', 4))\n"
            "todo = await db.reembed_todo(10)\n"
            "await db.store_reembed([(t.chunk_id, np.eye(4, dtype=np.float32)[int(t.content[-1])])"
            " for t in todo])\n"
            "await db.finish_reembed()",
        )
        hits = await db.similarity_search(np.eye(4, dtype=np.float32)[1], guild_id=1)
        assert hits[0].content == "text 1" and abs(hits[0].score - 1.0) < 1e-6
        assert await db.get_embedding_config() == EmbeddingConfig("new", 4)
        with pytest.raises(DimensionMismatchError):
            await db.similarity_search(unit(1), guild_id=1)
