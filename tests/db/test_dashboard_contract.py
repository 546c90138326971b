"""The dashboard's part of the storage contract, on SQLite and on PostgreSQL.

Every listing and delete is scoped to one guild: an id taken from another guild finds
nothing. The pause switch and backup outcomes written through one connection are seen
through another (as a separate ``kotonoha dashboard`` process and the bot would).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.db.checks import MAX_DASHBOARD_PAGE
from kotonoha_bot.db.contract import CAP_ANN_INDEX
from kotonoha_bot.errors import InvalidInputError
from kotonoha_bot.models import (
    BackupRecord,
    ChatSession,
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Memory,
    Message,
    UsageRecord,
)

DIM = 8
GUILD, OTHER = 111, 222


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


async def document(
    db: DatabaseProtocol, guild: int, uri: str, texts: list[str], *, embed: bool = True
) -> KnowledgeSource:
    await db.set_embedding_config(EmbeddingConfig("test-model", DIM))
    chunks = [
        KnowledgeChunk(f"k{i}", t, i, vec(hash((uri, i)) % 1000) if embed else None)
        for i, t in enumerate(texts)
    ]
    return await db.save_source(KnowledgeSource(guild, uri, uri.title()), chunks)


async def conversation(
    db: DatabaseProtocol, key: str, guild: int, channel: int, authors: list[int], **kw: object
) -> ChatSession:
    at = kw.pop("at", datetime(2026, 3, 1, tzinfo=UTC))
    assert isinstance(at, datetime)
    session = ChatSession(key, "mention", guild_id=guild, channel_id=channel, created_at=at, **kw)  # type: ignore[arg-type]
    for i, author in enumerate(authors):
        session.add_message(
            Message("user", f"{key} says {i}", at + timedelta(minutes=i), author_id=author)
        )
    session.last_active_at = at + timedelta(minutes=len(authors))
    await db.save_session(session)
    loaded = await db.load_session(key)
    assert loaded is not None
    return loaded


async def test_guilds_are_listed_with_their_counts_and_dms_are_not(db: DatabaseProtocol) -> None:
    await document(db, GUILD, "a.md", ["one", "two"])
    await conversation(db, "mention:1:5", GUILD, 1, [5])
    await db.add_memory(Memory(5, "好きな色は青", guild_id=OTHER), max_per_user=10)
    await db.add_memory(Memory(5, "DM only", guild_id=None), max_per_user=10)
    await db.save_session(ChatSession("dm:9", "dm", channel_id=9, user_id=5))
    await db.record_usage(UsageRecord(datetime(2026, 3, 1).date(), "m", guild_id=333))
    guilds = {g.guild_id: g for g in await db.list_guilds()}
    assert sorted(guilds) == [GUILD, OTHER, 333]
    assert (guilds[GUILD].sources, guilds[GUILD].chunks, guilds[GUILD].sessions) == (1, 2, 1)
    assert guilds[OTHER].memories == 1 and guilds[OTHER].sessions == 0
    assert guilds[GUILD].last_active_at is not None
    assert guilds[333].last_active_at is None


async def test_source_summaries_count_chunks_and_pending_within_one_guild(
    db: DatabaseProtocol,
) -> None:
    await document(db, GUILD, "ready.md", ["a", "b", "c"])
    await document(db, GUILD, "pending.md", ["d", "e"], embed=False)
    await document(db, OTHER, "theirs.md", ["x"])
    summaries = {s.source.uri: s for s in await db.source_summaries(GUILD)}
    assert set(summaries) == {"ready.md", "pending.md"}
    assert (summaries["ready.md"].chunks, summaries["ready.md"].pending) == (3, 0)
    assert (summaries["pending.md"].chunks, summaries["pending.md"].pending) == (2, 2)
    assert summaries["pending.md"].source.status == "pending"


async def test_chunk_pages_follow_chunk_order_and_never_show_another_guild(
    db: DatabaseProtocol,
) -> None:
    mine = await document(db, GUILD, "long.md", [f"part {i}" for i in range(7)])
    theirs = await document(db, OTHER, "theirs.md", ["secret of the other guild"])
    assert mine.source_id is not None and theirs.source_id is not None
    first = await db.list_chunk_page(mine.source_id, guild_id=GUILD, limit=3)
    rest = await db.list_chunk_page(mine.source_id, guild_id=GUILD, offset=3, limit=10)
    assert [c.content for c in first + rest] == [f"part {i}" for i in range(7)]
    assert all(c.embedded and c.guild_id == GUILD for c in first + rest)
    # Another guild's source id through this guild: nothing.
    assert await db.list_chunk_page(theirs.source_id, guild_id=GUILD) == []
    their_chunk = (await db.list_chunk_page(theirs.source_id, guild_id=OTHER))[0]
    assert await db.get_chunk(their_chunk.chunk_id, guild_id=GUILD) is None
    got = await db.get_chunk(their_chunk.chunk_id, guild_id=OTHER)
    assert got is not None and got.content == "secret of the other guild"


async def test_a_deleted_chunk_is_gone_from_both_searches_and_only_in_its_guild(
    db: DatabaseProtocol,
) -> None:
    src = await document(db, GUILD, "notes.md", ["水曜日の会議は十五時から", "金曜日は休み"])
    theirs = await document(db, OTHER, "theirs.md", ["水曜日の会議は別の話"])
    assert src.source_id is not None and theirs.source_id is not None
    target = (await db.list_chunk_page(src.source_id, guild_id=GUILD))[0]
    their_chunk = (await db.list_chunk_page(theirs.source_id, guild_id=OTHER))[0]
    query = vec(hash(("notes.md", 0)) % 1000)
    assert (await db.similarity_search(query, guild_id=GUILD, top_k=1))[0].chunk_id == (
        target.chunk_id
    )
    # Through the wrong guild: refused, nothing changes.
    assert not await db.delete_chunk(their_chunk.chunk_id, guild_id=GUILD)
    assert await db.get_chunk(their_chunk.chunk_id, guild_id=OTHER) is not None

    assert await db.delete_chunk(target.chunk_id, guild_id=GUILD)
    assert not await db.delete_chunk(target.chunk_id, guild_id=GUILD)
    hits = await db.similarity_search(query, guild_id=GUILD, top_k=10)
    assert target.chunk_id not in {h.chunk_id for h in hits}
    keyword = await db.keyword_search("会議", guild_id=GUILD, top_k=10)
    assert target.chunk_id not in {h.chunk_id for h in keyword}
    left = await db.source_summaries(GUILD)
    assert [(s.source.uri, s.chunks) for s in left] == [("notes.md", 1)]
    # The last chunk of a source takes the source with it.
    last = (await db.list_chunk_page(src.source_id, guild_id=GUILD))[0]
    assert await db.delete_chunk(last.chunk_id, guild_id=GUILD)
    assert await db.source_summaries(GUILD) == []
    assert await db.get_source(src.source_id) is None


async def test_sessions_are_found_by_channel_thread_and_user_newest_first(
    db: DatabaseProtocol,
) -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    await conversation(db, "mention:10:5", GUILD, 10, [5, 5], user_id=5, at=t0)
    await conversation(db, "eavesdrop:10", GUILD, 10, [6, 7], at=t0 + timedelta(hours=1))
    await conversation(db, "thread:99", GUILD, 20, [7], thread_id=99, at=t0 + timedelta(hours=2))
    await conversation(db, "mention:10:6", OTHER, 10, [5], user_id=5, at=t0)
    keys = [s.session_key for s in await db.find_sessions(guild_id=GUILD)]
    assert keys == ["thread:99", "eavesdrop:10", "mention:10:5"]
    by_channel = await db.find_sessions(guild_id=GUILD, channel_id=10)
    assert [s.session_key for s in by_channel] == ["eavesdrop:10", "mention:10:5"]
    by_thread = await db.find_sessions(guild_id=GUILD, channel_id=99)
    assert [s.session_key for s in by_thread] == ["thread:99"]
    by_user = await db.find_sessions(guild_id=GUILD, user_id=7)
    assert [s.session_key for s in by_user] == ["thread:99", "eavesdrop:10"]
    page = await db.find_sessions(guild_id=GUILD, offset=1, limit=1)
    assert [s.session_key for s in page] == ["eavesdrop:10"]


async def test_deleting_a_conversation_takes_the_knowledge_built_from_it(
    db: DatabaseProtocol,
) -> None:
    session = await conversation(db, "mention:10:5", GUILD, 10, [5, 5, 5], user_id=5)
    other = await conversation(db, "mention:10:6", OTHER, 10, [6], user_id=6)
    ids = tuple(m.stored_id for m in session.messages if m.stored_id is not None)
    await db.set_embedding_config(EmbeddingConfig("test-model", DIM))
    await db.save_source(
        KnowledgeSource(
            GUILD,
            "session:mention:10:5",
            "conversation",
            source_type="conversation",
            session_key="mention:10:5",
        ),
        [KnowledgeChunk("w0", "mention:10:5 says 0 and 1", 0, vec(1), message_ids=ids[:2])],
    )
    await document(db, GUILD, "doc.md", ["a document stays"])
    # Another guild's session key through this guild: nothing happens.
    refused = await db.delete_conversation(other.session_key, guild_id=GUILD)
    assert (refused.sessions, refused.messages) == (0, 0)
    assert await db.load_session(other.session_key) is not None

    result = await db.delete_conversation("mention:10:5", guild_id=GUILD)
    assert (result.sessions, result.messages, result.chunks, result.sources) == (1, 3, 1, 1)
    assert await db.load_session("mention:10:5") is None
    assert [s.source.uri for s in await db.source_summaries(GUILD)] == ["doc.md"]
    hits = await db.keyword_search("says", guild_id=GUILD, top_k=10)
    assert hits == []


async def test_the_pause_switch_is_seen_by_another_connection(
    database_url: str, settings: Settings
) -> None:
    async with (
        open_database(database_url, settings=settings) as dashboard,
        open_database(database_url, settings=settings) as bot,
    ):
        assert not (await bot.pause_state()).paused
        paused = await dashboard.set_paused(True, by="dashboard")
        assert paused.paused and paused.by == "dashboard" and paused.since is not None
        seen = await bot.pause_state()
        assert seen.paused and seen.since == paused.since
        again = await dashboard.set_paused(True, by="someone else")
        assert again.since == paused.since and again.by == "dashboard"
        assert not (await dashboard.set_paused(False)).paused
        assert not (await bot.pause_state()).paused


async def test_backup_outcomes_are_kept_one_success_and_one_failure(
    database_url: str, settings: Settings
) -> None:
    at = datetime(2026, 3, 2, 3, 4, 5, tzinfo=UTC)
    async with (
        open_database(database_url, settings=settings) as bot,
        open_database(database_url, settings=settings) as dashboard,
    ):
        assert await dashboard.last_backup() is None
        ok = BackupRecord(at, True, "/backups/kotonoha-1.db", "sqlite-online-backup", 4096)
        await bot.record_backup(ok)
        await bot.record_backup(BackupRecord(at + timedelta(hours=1), False, error="disk full"))
        assert await dashboard.last_backup() == ok
        failed = await dashboard.last_backup(failed=True)
        assert failed is not None and failed.error == "disk full" and not failed.ok
        with pytest.raises(InvalidInputError):
            await bot.record_backup(BackupRecord(datetime(2026, 1, 1), True))
        with pytest.raises(InvalidInputError):
            await bot.record_backup(BackupRecord(at, True, path="a\x00b"))


async def test_the_vector_index_state_says_what_serves_searches(db: DatabaseProtocol) -> None:
    await document(db, GUILD, "a.md", ["one", "two", "three"])
    await db.similarity_search(vec(1), guild_id=GUILD, top_k=1)
    state = await db.vector_index_state()
    assert state.state == "ready", state
    assert state.kind and state.detail
    if CAP_ANN_INDEX in db.capabilities:
        assert state.kind in ("hnsw", "ivfflat")
    else:
        assert "3 of 3" in state.detail


async def test_bad_pages_and_ids_are_typed_errors(db: DatabaseProtocol) -> None:
    for kwargs in ({"limit": 0}, {"limit": MAX_DASHBOARD_PAGE + 1}, {"offset": -1}):
        with pytest.raises(InvalidInputError):
            await db.find_sessions(guild_id=GUILD, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        await db.list_chunk_page(1, guild_id=2**63)
    with pytest.raises(InvalidInputError):
        await db.delete_chunk(-1, guild_id=GUILD)
    with pytest.raises(InvalidInputError):
        await db.set_paused(True, by="nul\x00")
