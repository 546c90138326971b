"""Discord and row ids outside 0 <= id < 2^63 are a typed error on every contract path,
on both backends (SQLite used to overflow with a traceback; PostgreSQL with a driver error)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kotonoha_bot.db import DatabaseProtocol
from kotonoha_bot.errors import InvalidInputError
from kotonoha_bot.models import ChatSession, EmbeddingConfig, KnowledgeChunk, KnowledgeSource
from tests.hostile.cases import CASES, Case
from tests.hostile.runner import check_case

AREA = [c for c in CASES if c.area == "ids"]
BAD_IDS = [2**63, 2**64 + 5, -1, -(2**63) - 1, True]
VEC = np.ones(4, np.float32)

Call = Callable[[DatabaseProtocol, Any], Awaitable[object]]

PATHS: dict[str, Call] = {
    "similarity_search guild": lambda db, i: db.similarity_search(VEC, guild_id=i),
    "similarity_search channel": lambda db, i: db.similarity_search(VEC, guild_id=1, channel_id=i),
    "keyword_search guild": lambda db, i: db.keyword_search("会議", guild_id=i),
    "keyword_search channel": lambda db, i: db.keyword_search("会議", guild_id=1, channel_id=i),
    "list_sessions": lambda db, i: db.list_sessions(guild_id=i),
    "forget guild": lambda db, i: db.forget(guild_id=i),
    "forget user": lambda db, i: db.forget(guild_id=1, user_id=i),
    "find_source": lambda db, i: db.find_source(i, "x"),
    "list_sources": lambda db, i: db.list_sources(guild_id=i),
    "get_source": lambda db, i: db.get_source(i),
    "delete_source": lambda db, i: db.delete_source(i),
    "list_chunks": lambda db, i: db.list_chunks(i),
    "add_chunks": lambda db, i: db.add_chunks(i, []),
    "set_source_hash": lambda db, i: db.set_source_hash(i, "h"),
    "set_chunk_embeddings": lambda db, i: db.set_chunk_embeddings([(i, VEC)]),
    "save_source": lambda db, i: db.save_source(
        KnowledgeSource(guild_id=i, uri="u", title="t"), []),
    "save_source chunk channel": lambda db, i: db.save_source(
        KnowledgeSource(guild_id=1, uri="u", title="t"),
        [KnowledgeChunk("k", "c", 0, VEC, channel_id=i)]),
    "save_session": lambda db, i: db.save_session(ChatSession(
        session_key="s", session_type="mention", guild_id=i,
        created_at=datetime.now(UTC), last_active_at=datetime.now(UTC))),
}  # fmt: skip


@pytest.mark.parametrize("case", AREA, ids=[c.slug for c in AREA])
def test_operator_case(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path / "work")


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
@pytest.mark.parametrize("path", PATHS.values(), ids=list(PATHS))
async def test_an_id_out_of_range_is_refused_on_every_path(
    path: Call, bad: Any, db: DatabaseProtocol
) -> None:
    await db.set_embedding_config(EmbeddingConfig("m", 4))
    await db.save_source(KnowledgeSource(guild_id=1, uri="keep", title="keep"),
                         [KnowledgeChunk("k", "会議", 0, VEC)])  # fmt: skip
    with pytest.raises(InvalidInputError, match="64-bit integer"):
        await path(db, bad)
    assert [s.uri for s in await db.list_sources()] == ["keep"]


async def test_the_largest_ids_still_work(db: DatabaseProtocol) -> None:
    top = 2**63 - 1
    await db.set_embedding_config(EmbeddingConfig("m", 4))
    await db.save_source(KnowledgeSource(guild_id=top, channel_id=top, uri="u", title="t"),
                         [KnowledgeChunk("k", "会議", 0, VEC)])  # fmt: skip
    hits = await db.similarity_search(VEC, guild_id=top, channel_id=top)
    assert [h.guild_id for h in hits] == [top]
    assert await db.find_source(top, "u") is not None
