"""The session manager on both backends: durability, restore, conflicts, batch mode."""

from __future__ import annotations

from datetime import timedelta

from kotonoha_bot.chat import Conversation, SessionManager
from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.models import ChatSession, Message, utcnow

CONV = Conversation.mention(guild_id=1, channel_id=10, user_id=100)


def texts(session: ChatSession | None) -> list[str]:
    assert session is not None
    return [m.content for m in session.messages]


async def test_every_append_is_stored_before_it_returns(db: DatabaseProtocol) -> None:
    manager = SessionManager(db)
    async with manager.open(CONV) as handle:
        await handle.append(Message("user", "one", author_id=100))
        assert texts(await db.load_session(CONV.session_key)) == ["one"]
        await handle.append(Message("assistant", "two"))
        assert texts(await db.load_session(CONV.session_key)) == ["one", "two"]
    stored = await db.load_session(CONV.session_key)
    assert stored is not None
    assert (stored.session_type, stored.guild_id, stored.channel_id, stored.user_id) == (
        "mention",
        1,
        10,
        100,
    )
    assert manager.unsaved_count() == 0


async def test_sessions_restore_after_a_restart(
    db: DatabaseProtocol, database_url: str, settings: Settings
) -> None:
    first = SessionManager(db)
    async with first.open(CONV) as handle:
        await handle.append(Message("user", "覚えていてね"), Message("assistant", "はい"))
    async with open_database(database_url, settings=settings) as reopened:
        second = SessionManager(reopened)
        async with second.open(CONV) as handle:
            assert texts(handle.session) == ["覚えていてね", "はい"]
            await handle.append(Message("user", "続き"))
    assert texts(await db.load_session(CONV.session_key)) == ["覚えていてね", "はい", "続き"]


async def test_conflict_between_two_managers_reloads_and_appends(
    db: DatabaseProtocol, database_url: str, settings: Settings
) -> None:
    """Two bot processes on one database: neither message is dropped or duplicated."""
    async with open_database(database_url, settings=settings) as other_db:
        a = SessionManager(db)
        b = SessionManager(other_db)
        async with a.open(CONV) as ha:
            await ha.append(Message("user", "a1"))
        async with b.open(CONV) as hb:  # b loads a1
            await hb.append(Message("user", "b1"))
        async with a.open(CONV) as ha:  # a's copy is stale (version 1, stored 2)
            await ha.append(Message("user", "a2"))
            assert texts(ha.session) == ["a1", "b1", "a2"]
        async with b.open(CONV) as hb:  # and now b's copy is stale
            await hb.append(Message("assistant", "b2"))
        assert a.conflicts_resolved == 1 and b.conflicts_resolved == 1
    assert texts(await db.load_session(CONV.session_key)) == ["a1", "b1", "a2", "b2"]


async def test_two_managers_creating_the_same_session(
    db: DatabaseProtocol, database_url: str, settings: Settings
) -> None:
    async with open_database(database_url, settings=settings) as other_db:
        a, b = SessionManager(db), SessionManager(other_db)
        async with a.open(CONV) as ha, b.open(CONV) as hb:  # both see "no session yet"
            await ha.append(Message("user", "from a"))
            await hb.append(Message("user", "from b"))  # version 0 vs stored 1
    assert texts(await db.load_session(CONV.session_key)) == ["from a", "from b"]


async def test_a_deleted_session_is_recreated_with_the_unsaved_messages(
    db: DatabaseProtocol,
) -> None:
    manager = SessionManager(db)
    async with manager.open(CONV) as handle:
        await handle.append(Message("user", "old"))
    await db.forget(guild_id=1)  # an admin deleted the guild's data meanwhile
    async with manager.open(CONV) as handle:  # the cached copy still holds "old"
        await handle.append(Message("user", "new"))
    assert texts(await db.load_session(CONV.session_key)) == ["new"]


async def test_invalidate_after_forget_drops_the_forgotten_messages_from_memory(
    db: DatabaseProtocol,
) -> None:
    conv = Conversation.thread(1, 10, 555)
    manager = SessionManager(db)
    async with manager.open(conv) as handle:
        await handle.append(
            Message("user", "秘密の話", author_id=7), Message("user", "こんにちは", author_id=8)
        )
    await db.forget(guild_id=1, user_id=7)
    manager.invalidate(guild_id=1)
    async with manager.open(conv) as handle:
        assert texts(handle.session) == ["こんにちは"]


async def test_batch_mode_saves_on_flush(db: DatabaseProtocol) -> None:
    manager = SessionManager(db, sync_interval=60)
    async with manager.open(CONV) as handle:
        await handle.append(Message("user", "later"))
    assert await db.load_session(CONV.session_key) is None
    assert manager.unsaved_count() == 1
    assert await manager.flush() == 1
    assert texts(await db.load_session(CONV.session_key)) == ["later"]
    assert manager.unsaved_count() == 0


async def test_cache_is_bounded_and_evicts_idle_sessions(db: DatabaseProtocol) -> None:
    manager = SessionManager(db, max_cached=2)
    for user in range(4):
        async with manager.open(Conversation.mention(1, 10, user)) as handle:
            await handle.append(Message("user", f"u{user}"))
    assert len(manager._cache) == 2
    assert manager.evict_idle(utcnow() + timedelta(seconds=1)) == 2
    assert len(manager._cache) == 0
    async with manager.open(Conversation.mention(1, 10, 0)) as handle:
        assert texts(handle.session) == ["u0"]
