"""The storage contract for memory that follows Discord, on both backends.

Provenance (chunks know their messages, messages know where they are on Discord),
edits and deletes, forget, explicit memories and usage records. Every test runs on a
real SQLite file and a real PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from kotonoha_bot.db import DatabaseProtocol
from kotonoha_bot.errors import InvalidInputError, InvalidTextError
from kotonoha_bot.models import (
    ChatSession,
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Memory,
    Message,
    MessageLink,
    UsageRecord,
)
from tests.db.old_schema import OLD_SCHEMA_WRITERS

GUILD = 7_000_000_000_000_000_001
OTHER_GUILD = 7_000_000_000_000_000_002
CHANNEL = 7_100_000_000_000_000_001
THREAD = 7_200_000_000_000_000_001
MINA, YUU = 301, 302
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def turn(i: int, author: int, text: str, *, channel: int = CHANNEL) -> list[Message]:
    """A user message (Discord id 1000+i) and the bot's reply of the same turn."""
    mid = 1000 + i
    when = T0 + timedelta(minutes=i)
    return [
        Message("user", text, when, author, f"user{author}", mid, channel, mid),
        Message("assistant", f"echo: {text}", when, None, None, None, channel, mid),
    ]


async def store(db: DatabaseProtocol, session: ChatSession) -> ChatSession:
    await db.save_session(session)
    loaded = await db.load_session(session.session_key)
    assert loaded is not None
    return loaded


async def archive(
    db: DatabaseProtocol, session: ChatSession, spans: list[tuple[int, int]], *, save: bool = True
) -> list[int]:
    """Store windows of a session as chunks with provenance (like the archiver)."""
    assert session.guild_id is not None
    source = await db.ensure_source(
        KnowledgeSource(
            guild_id=session.guild_id,
            channel_id=session.channel_id,
            uri=f"session:{session.session_key}",
            title="conversation",
            source_type="conversation",
            session_key=session.session_key,
        )
    )
    assert source.source_id is not None
    chunks = []
    for a, b in spans:
        part = session.messages[a : b + 1]
        chunks.append(
            KnowledgeChunk(
                chunk_key=f"{session.session_key}:{a}-{b}",
                content="\n".join(m.content for m in part),
                chunk_index=a,
                metadata={
                    "kind": "conversation",
                    "session_key": session.session_key,
                    "first_index": a,
                    "last_index": b,
                    "author_ids": sorted({m.author_id for m in part if m.author_id}),
                },
                message_ids=tuple(m.stored_id for m in part if m.stored_id is not None),
            )
        )
    await db.add_chunks(source.source_id, chunks)
    if save:
        session.last_archived_message_index = max(b for _, b in spans)
        await db.save_session(session)
    return [c.chunk_id for c in await db.list_chunks(source.source_id) if c.chunk_id]


def thread_session(*turns: list[Message]) -> ChatSession:
    s = ChatSession(
        f"thread:{THREAD}", "thread", guild_id=GUILD, channel_id=CHANNEL, thread_id=THREAD
    )
    for t in turns:
        for m in t:
            s.add_message(m)
    return s


async def all_text(db: DatabaseProtocol, guild: int = GUILD) -> str:
    """Every stored message and chunk text of a guild, to look for what must be gone."""
    parts = []
    for info in await db.list_sessions(guild_id=guild):
        s = await db.load_session(info.session_key)
        assert s is not None
        parts += [m.content for m in s.messages]
    for src in await db.list_sources(guild_id=guild):
        assert src.source_id is not None
        parts += [c.content for c in await db.list_chunks(src.source_id)]
    return "\n".join(parts)


async def test_messages_keep_where_they_are_on_discord(db: DatabaseProtocol) -> None:
    s = await store(db, thread_session(turn(1, MINA, "こんにちは", channel=THREAD)))
    user, reply = s.messages
    assert (user.discord_message_id, user.channel_id, user.turn_id) == (1001, THREAD, 1001)
    assert (reply.discord_message_id, reply.channel_id, reply.turn_id) == (None, THREAD, 1001)
    assert user.stored_id is not None and reply.stored_id is not None
    assert reply.stored_id > user.stored_id


async def test_chunks_record_their_messages_and_link_back(db: DatabaseProtocol) -> None:
    s = await store(
        db,
        thread_session(
            turn(1, MINA, "東京の話", channel=THREAD), turn(2, YUU, "京都の話", channel=THREAD)
        ),
    )
    # The bot's reply of turn 1 was sent as two Discord messages.
    assert await db.record_reply_parts(s.session_key, 1001, THREAD, [5001, 5002]) == 2
    assert await db.record_reply_parts(s.session_key, 9999, THREAD, [5003]) == 0  # no such turn
    ids = await archive(db, s, [(0, 1), (1, 3)])
    sources = await db.list_sources(guild_id=GUILD)
    chunks = await db.list_chunks(sources[0].source_id or 0)
    assert [c.message_ids for c in chunks] == [
        tuple(m.stored_id for m in s.messages[0:2]),
        tuple(m.stored_id for m in s.messages[1:4]),
    ]
    origins = await db.chunk_origins([*ids, 424242])
    assert set(origins) == set(ids)
    first, second = origins[ids[0]], origins[ids[1]]
    assert first.first_link == MessageLink(GUILD, THREAD, 1001)
    assert first.first_link.url == f"https://discord.com/channels/{GUILD}/{THREAD}/1001"
    # The reply has no Discord id of its own: its first sent part stands for it.
    assert second.links == (MessageLink(GUILD, THREAD, 5001), MessageLink(GUILD, THREAD, 1002))


async def test_a_chunk_whose_message_is_gone_is_never_stored(db: DatabaseProtocol) -> None:
    s = await store(db, thread_session(turn(1, MINA, "秘密の話"), turn(2, YUU, "ふつうの話")))
    await db.delete_messages(guild_id=GUILD, discord_message_ids=[1001])
    # An archiver that loaded the session before the delete tries to store its windows.
    ids = await archive(db, s, [(0, 1), (2, 3)], save=False)
    assert len(ids) == 1
    assert "秘密" not in await all_text(db)


async def test_delete_removes_the_message_its_reply_and_what_was_built_from_them(
    db: DatabaseProtocol,
) -> None:
    s = await store(
        db,
        thread_session(
            turn(1, MINA, "電話番号は090-1111-2222"),
            turn(2, YUU, "猫が好き"),
            turn(3, MINA, "犬も好き"),
            turn(4, YUU, "まだ話してない"),
        ),
    )
    ids = await archive(db, s, [(0, 3), (2, 5)])  # turn 4 is not archived yet
    assert len(ids) == 2
    # The wrong guild (or a DM) cannot reach it.
    assert (
        await db.delete_messages(guild_id=OTHER_GUILD, discord_message_ids=[1001])
    ).messages == 0
    assert (await db.delete_messages(guild_id=None, discord_message_ids=[1001])).messages == 0

    change = await db.delete_messages(guild_id=GUILD, discord_message_ids=[1001, 777])
    assert change.messages == 2  # the message and the bot's reply that echoed it
    assert change.chunks == 1
    assert change.sessions == (s.session_key,)
    # Turn 2 shared the removed window: archive it again without turn 1.
    assert change.rearchive == {s.session_key: tuple(m.stored_id for m in s.messages[2:4])}
    text = await all_text(db)
    assert "090-1111-2222" not in text
    assert "猫が好き" in text
    after = await db.load_session(s.session_key)
    assert after is not None and after.version == s.version + 1
    assert [m.content for m in after.messages][:2] == ["猫が好き", "echo: 猫が好き"]
    # Six messages were archived (indexes 0-5); two of them went: 0-3 are archived now,
    # so turn 4 (indexes 4-5) is still waiting for the archiver.
    assert after.last_archived_message_index == 3
    assert set(await db.chunk_origins(ids)) == {ids[1]}


async def test_deleting_a_part_of_the_bots_reply_removes_the_reply(db: DatabaseProtocol) -> None:
    s = await store(db, thread_session(turn(1, MINA, "質問"), turn(2, YUU, "別の話")))
    await db.record_reply_parts(s.session_key, 1001, CHANNEL, [5001, 5002])
    ids = await archive(db, s, [(0, 3)])
    change = await db.delete_messages(guild_id=GUILD, discord_message_ids=[5002])
    assert change.messages == 1 and change.chunks == 1
    after = await db.load_session(s.session_key)
    assert after is not None
    assert [m.content for m in after.messages] == ["質問", "別の話", "echo: 別の話"]
    assert set(change.rearchive[s.session_key]) == {m.stored_id for m in after.messages}
    assert await db.chunk_origins(ids) == {}


async def test_an_edit_replaces_the_text_and_its_chunks(db: DatabaseProtocol) -> None:
    s = await store(
        db, thread_session(turn(1, MINA, "住所は東京都港区1-2-3"), turn(2, YUU, "へえ"))
    )
    ids = await archive(db, s, [(0, 3)])
    same = await db.edit_message(
        guild_id=GUILD, discord_message_id=1001, content="住所は東京都港区1-2-3"
    )
    assert same.messages == 0 and same.chunks == 0  # an embed unfurl changes nothing
    change = await db.edit_message(guild_id=GUILD, discord_message_id=1001, content="住所は秘密")
    # The message changed and the bot's reply to the old words (it repeated them) went.
    assert change.messages == 2 and change.chunks == 1
    kept = (s.messages[0], *s.messages[2:])
    assert change.rearchive == {s.session_key: tuple(m.stored_id for m in kept)}
    after = await db.load_session(s.session_key)
    assert after is not None
    assert [m.content for m in after.messages] == ["住所は秘密", "へえ", "echo: へえ"]
    assert after.version == s.version + 1
    assert "港区" not in await all_text(db)
    assert await db.chunk_origins(ids) == {}
    # Nothing stored under that id in a DM, and NUL is refused before anything is written.
    assert (
        await db.edit_message(guild_id=None, discord_message_id=1001, content="x")
    ).messages == 0
    with pytest.raises(InvalidTextError):
        await db.edit_message(guild_id=GUILD, discord_message_id=1002, content="a\x00b")


async def test_a_deleted_channel_takes_its_conversations_but_not_its_documents(
    db: DatabaseProtocol,
) -> None:
    thread = await store(db, thread_session(turn(1, MINA, "スレッドの話", channel=THREAD)))
    await archive(db, thread, [(0, 1)])
    mention = ChatSession(
        f"mention:{CHANNEL}:{MINA}", "mention", guild_id=GUILD, channel_id=CHANNEL, user_id=MINA
    )
    for m in turn(2, MINA, "チャンネルの話"):
        mention.add_message(m)
    await db.save_session(mention)
    elsewhere = ChatSession(
        "mention:99:301", "mention", guild_id=GUILD, channel_id=99, user_id=MINA
    )
    for m in turn(3, MINA, "別のチャンネル", channel=99):
        elsewhere.add_message(m)
    await db.save_session(elsewhere)
    await db.save_source(
        KnowledgeSource(guild_id=GUILD, channel_id=CHANNEL, uri="faq.md", title="FAQ"),
        [KnowledgeChunk("faq-0", "資料はのこる")],
    )

    change = await db.delete_channel_messages(guild_id=GUILD, channel_id=CHANNEL)
    assert change.messages == 4 and change.chunks == 1
    assert set(change.sessions) == {thread.session_key, mention.session_key}
    assert await db.load_session(thread.session_key) is None
    assert await db.load_session(mention.session_key) is None
    text = await all_text(db)
    assert "別のチャンネル" in text and "資料はのこる" in text
    assert "スレッドの話" not in text and "チャンネルの話" not in text


async def test_forget_me_takes_my_sessions_my_echoes_and_my_memories(db: DatabaseProtocol) -> None:
    shared = await store(
        db,
        thread_session(
            turn(1, MINA, "番号は080-3333-4444"), turn(2, YUU, "ユウの話"), turn(3, MINA, "またね")
        ),
    )
    await archive(db, shared, [(0, 3), (2, 5)])
    own = ChatSession(
        f"mention:{CHANNEL}:{MINA}", "mention", guild_id=GUILD, channel_id=CHANNEL, user_id=MINA
    )
    for m in turn(4, MINA, "自分だけの話"):
        own.add_message(m)
    own = await store(db, own)
    await archive(db, own, [(0, 1)])
    await db.add_memory(Memory(MINA, "コーヒーが苦手", GUILD), max_per_user=10)
    await db.add_memory(Memory(MINA, "DMの秘密", None), max_per_user=10)
    await db.add_memory(Memory(YUU, "ユウの記憶", GUILD), max_per_user=10)

    result = await db.forget(guild_id=GUILD, user_id=MINA)
    assert result.sessions == 1  # the mention session was Mina's own
    assert result.messages == 2 + 4  # own session (2) + her 2 messages and 2 replies
    assert result.memories == 1
    assert set(result.session_keys) == {shared.session_key, own.session_key}
    text = await all_text(db)
    assert "080-3333-4444" not in text and "自分だけ" not in text and "またね" not in text
    assert "ユウの話" in text  # Yuu's messages stay...
    after = await db.load_session(shared.session_key)
    assert after is not None and [m.content for m in after.messages] == [
        "ユウの話",
        "echo: ユウの話",
    ]
    # ...and the windows they shared with Mina are to be archived again.
    assert result.rearchive == {shared.session_key: tuple(m.stored_id for m in after.messages)}
    assert after.last_archived_message_index == 1
    assert [m.content for m in await db.list_memories(guild_id=GUILD)] == ["ユウの記憶"]
    assert [m.content for m in await db.list_memories(guild_id=None, user_id=MINA)] == ["DMの秘密"]


async def test_forgetting_an_archived_message_keeps_later_ones_unarchived(
    db: DatabaseProtocol,
) -> None:
    """Deleting before the archived boundary must not make a new message look archived."""
    s = await store(db, thread_session(turn(1, MINA, "a"), turn(2, YUU, "b"), turn(3, YUU, "c")))
    await archive(db, s, [(0, 3)])  # turns 1-2 archived, turn 3 (indexes 4, 5) not
    await db.forget(guild_id=GUILD, user_id=MINA)
    after = await db.load_session(s.session_key)
    assert after is not None
    assert [m.content for m in after.messages] == ["b", "echo: b", "c", "echo: c"]
    assert after.last_archived_message_index == 1  # "c" still waits for the archiver


async def test_memories_stay_with_their_owner_and_scope(db: DatabaseProtocol) -> None:
    first = await db.add_memory(Memory(MINA, "猫を飼っている", GUILD), max_per_user=2)
    assert first.memory_id is not None and first.created_at is not None
    await db.add_memory(Memory(MINA, "甘いものが好き", GUILD), max_per_user=2)
    with pytest.raises(InvalidInputError, match="at most 2"):
        await db.add_memory(Memory(MINA, "三つ目", GUILD), max_per_user=2)
    await db.add_memory(Memory(MINA, "別のサーバー", OTHER_GUILD), max_per_user=2)
    await db.add_memory(Memory(MINA, "DMだけの話", None), max_per_user=2)
    await db.add_memory(Memory(YUU, "ユウの好物", GUILD), max_per_user=2)

    mine = await db.list_memories(guild_id=GUILD, user_id=MINA)
    assert [m.content for m in mine] == ["甘いものが好き", "猫を飼っている"]  # newest first
    assert [m.content for m in await db.list_memories(guild_id=GUILD)] == [
        "ユウの好物",
        "甘いものが好き",
        "猫を飼っている",
    ]
    page = await db.list_memories(guild_id=GUILD, limit=1, before_id=mine[0].memory_id)
    assert [m.content for m in page] == ["猫を飼っている"]
    assert [m.content for m in await db.list_memories(guild_id=None, user_id=MINA)] == [
        "DMだけの話"
    ]
    with pytest.raises(InvalidInputError, match="private"):
        await db.list_memories(guild_id=None)

    # Yuu cannot delete Mina's memory; an admin of the guild (user None) can; other
    # scopes are untouched.
    assert not await db.delete_memory(first.memory_id, guild_id=GUILD, user_id=YUU)
    assert not await db.delete_memory(first.memory_id, guild_id=OTHER_GUILD, user_id=None)
    assert await db.delete_memory(first.memory_id, guild_id=GUILD, user_id=None)
    assert not await db.delete_memory(first.memory_id, guild_id=GUILD, user_id=None)
    for bad in ("", "  ", "a\x00b"):
        with pytest.raises(InvalidInputError):
            await db.add_memory(Memory(MINA, bad, GUILD), max_per_user=10)
    # Ids are never reused, so a deleted id cannot point at a newer memory.
    newer = await db.add_memory(Memory(MINA, "新しい", GUILD), max_per_user=10)
    assert newer.memory_id is not None and newer.memory_id > first.memory_id


async def test_usage_adds_up_per_day_guild_user_and_model(db: DatabaseProtocol) -> None:
    d1, d2 = date(2026, 3, 1), date(2026, 3, 2)
    for _ in range(3):
        await db.record_usage(UsageRecord(d1, "claude", GUILD, MINA, 1, 100, 20))
    await db.record_usage(UsageRecord(d1, "claude", GUILD, YUU, 1, 50, 5))
    await db.record_usage(UsageRecord(d1, "claude", GUILD, 0, 1, 7, 1))  # eavesdrop judgment
    await db.record_usage(UsageRecord(d2, "gpt", GUILD, MINA, 1, 10, 10))
    await db.record_usage(UsageRecord(d1, "claude", OTHER_GUILD, MINA, 1, 1000, 1000))
    await db.record_usage(UsageRecord(d1, "claude", 0, MINA, 1, 9, 9))  # a DM

    assert await db.tokens_used(day=d1, guild_id=GUILD) == 360 + 55 + 8
    assert await db.tokens_used(day=d1, guild_id=GUILD, user_id=MINA) == 360
    assert await db.tokens_used(day=d1, guild_id=0, user_id=MINA) == 18
    assert await db.tokens_used(day=date(2026, 3, 3), guild_id=GUILD) == 0
    rows = await db.list_usage(since=d1, until=d2, guild_id=GUILD)
    assert [
        (r.day, r.user_id, r.model, r.calls, r.input_tokens, r.output_tokens) for r in rows
    ] == [
        (d1, 0, "claude", 1, 7, 1),
        (d1, MINA, "claude", 3, 300, 60),
        (d1, YUU, "claude", 1, 50, 5),
        (d2, MINA, "gpt", 1, 10, 10),
    ]
    assert len(await db.list_usage(since=d1, until=d1)) == 5
    assert [r.guild_id for r in await db.list_usage(since=d1, until=d2, user_id=MINA)] == [
        0,
        GUILD,
        OTHER_GUILD,
        GUILD,
    ]
    for bad in (
        UsageRecord(d1, "", GUILD, MINA),
        UsageRecord(d1, "m", GUILD, MINA, 1, -1, 0),
        UsageRecord(d1, "m", -5, MINA),
    ):
        with pytest.raises(InvalidInputError):
            await db.record_usage(bad)


async def test_vector_search_still_finds_chunks_with_provenance(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("m", 4))
    s = await store(db, thread_session(turn(1, MINA, "ベクトル")))
    src = await db.ensure_source(
        KnowledgeSource(
            guild_id=GUILD,
            uri=f"session:{s.session_key}",
            title="c",
            source_type="conversation",
            session_key=s.session_key,
        )
    )
    vec = np.array([1, 0, 0, 0], dtype=np.float32)
    await db.add_chunks(
        src.source_id or 0,
        [
            KnowledgeChunk(
                "k",
                "ベクトル",
                embedding=vec,
                message_ids=tuple(m.stored_id or 0 for m in s.messages),
            )
        ],
    )
    hits = await db.similarity_search(vec, guild_id=GUILD, top_k=1)
    assert [h.content for h in hits] == ["ベクトル"]
    await db.delete_messages(guild_id=GUILD, discord_message_ids=[1001])
    assert await db.similarity_search(vec, guild_id=GUILD, top_k=1) == []


# --- upgrading a database written before provenance ----------------------------------


async def test_an_older_database_upgrades_with_provenance_filled_in(
    backend: str, database_url: str, settings: object
) -> None:
    from kotonoha_bot.db import open_database

    await OLD_SCHEMA_WRITERS[backend](database_url, GUILD, CHANNEL)
    async with open_database(database_url, settings=settings) as db:  # type: ignore[arg-type]
        assert await db.schema_version() >= 3
        s = await db.load_session("thread:9")
        assert s is not None
        assert [(m.channel_id, m.turn_id) for m in s.messages] == [
            (9, 11),
            (None, 11),
            (9, 12),
            (None, 12),
        ]
        (chunk,) = await db.list_chunks(1)
        assert chunk.message_ids == tuple(m.stored_id for m in s.messages)
        change = await db.delete_messages(guild_id=GUILD, discord_message_ids=[11])
        assert change.messages == 2 and change.chunks == 1
        assert "古い秘密" not in await all_text(db)
