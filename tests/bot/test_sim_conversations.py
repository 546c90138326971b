"""Conversations on a simulated Discord: mentions, replies, threads, DMs, eavesdrop, limits.

The production bot runs on SimCord (discord.py's real gateway, cache and HTTP layer on
an in-memory Discord) with real storage (both backends) and the real Anthropic SDK
against the fake API server. What a member would see is asserted from the simulated
channels; what the bot did on the wire from SimCord's record of its REST calls.
"""

from __future__ import annotations

from pathlib import Path

import discord
import pytest

from kotonoha_bot.bot import texts
from kotonoha_bot.bot.eavesdrop import EavesdropTracker
from kotonoha_bot.bot.handler import clean_content, thread_name
from kotonoha_bot.bot.ratelimit import RateLimiter
from kotonoha_bot.db import DatabaseProtocol
from tests.bot.sim import SimFactory
from tests.chat.support import add_document, chat_service, chat_settings, sent_turns
from tests.fakes.api_server import FakeAPIServer, Reply


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_clean_content_and_thread_names() -> None:
    class User:
        def __init__(self, id: int, name: str) -> None:
            self.id, self.display_name = id, name

    bot, other = User(1, "kotonoha"), User(7, "ユウ")
    assert clean_content("<@1> hi <@!1> <@7>", 1, [bot, other]) == "hi  @ユウ"
    assert thread_name("一行目\n二行目") == "一行目"
    assert thread_name("") == texts.THREAD_NAME_FALLBACK
    assert len(thread_name("あ" * 100)) == 40


async def test_a_mention_is_answered_as_a_reply_while_typing_and_stored(
    make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    async with make_sim() as sim:
        guild, general, mina = sim.room()
        message = await sim.mention(mina, general, "こんにちは")
        (reply,) = [m for m in general.history() if m.author.bot]
        assert reply.content == "echo: こんにちは"
        assert reply.reference is not None and reply.reference.message_id == message.id
        sent = [r for r in sim.env.http_requests if r.method == "POST"]
        typing = [r for r in sent if r.path.endswith("/typing")]
        posts = [r for r in sent if r.path == f"/channels/{general.id}/messages"]
        assert len(typing) == 1 and len(posts) == 1
        assert sent.index(typing[0]) < sent.index(posts[0])  # typing first, then the answer
        # The reply never pings: not the author, not @everyone, not roles.
        mentions = (posts[0].json or {}).get("allowed_mentions", {})
        assert mentions.get("parse") == [] and mentions.get("replied_user") is False
    stored = await db.load_session(f"mention:{general.id}:{mina.id}")
    assert stored is not None
    assert [(m.role, m.content) for m in stored.messages] == [
        ("user", "こんにちは"),
        ("assistant", "echo: こんにちは"),
    ]
    user, bot_reply = stored.messages
    assert (user.discord_message_id, user.channel_id, user.turn_id) == (
        message.id,
        general.id,
        message.id,
    )
    assert bot_reply.turn_id == message.id and bot_reply.channel_id == general.id
    assert stored.guild_id == guild.id and stored.channel_id == general.id


async def test_a_reply_to_the_bot_counts_as_a_mention(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        _guild, general, mina = sim.room()
        await sim.mention(mina, general, "最初")
        bot_message = next(m for m in general.history() if m.author.bot)
        await mina.send(general, "つづき", reply_to=bot_message)
        assert sim.bot_messages(general) == ["echo: 最初", "echo: つづき"]


async def test_bots_system_messages_and_unaddressed_talk_are_ignored(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        guild, general, mina = sim.room()
        other_bot = guild.add_member(sim.env.create_user("helper", bot=True))
        await mina.send(general, "独り言")  # no mention, eavesdrop is off
        assert sim.bot.user is not None
        await other_bot.send(general, f"{sim.bot.user.mention} hi")
        guild.add_member(sim.env.create_user("newcomer"))  # a join: a system message
        await sim.settle()
        assert sim.bot_messages(general) == []
        assert sim.api.requests == []


async def test_a_bare_mention_is_greeted_without_the_llm(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        await sim.mention(sim.member(guild, "ミナ"), general, "")
        assert sim.bot_messages(general) == [texts.GREETING]
        assert sim.api.requests == []


async def test_a_dm_uses_no_guild_knowledge(make_sim: SimFactory, db: DatabaseProtocol) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        mina = sim.member(guild, "ミナ")
        await add_document(sim.chat, guild.id, "g.md", "# 秘密\n秘密の合言葉はORCHIDです")
        await mina.user.send_dm("秘密の合言葉は？")
        dm = mina.user.dm_channel
        assert sim.bot_messages(dm) == ["echo: 秘密の合言葉は？"]
        assert "ORCHID" not in sim.prompt()
        assert await db.load_session(f"dm:{dm.id}") is not None


async def test_a_mention_opens_a_thread_that_continues_without_mentions(
    make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    async with make_sim(discord_mention_thread=True) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        first = await sim.mention(mina, general, "旅行の計画を立てたい")
        assert sim.bot_messages(general) == []  # answered in the thread, not here
        (thread,) = general.threads
        assert thread.name == "旅行の計画を立てたい"
        assert sim.bot_messages(thread) == ["echo: ミナ: 旅行の計画を立てたい"]  # speakers named
        await yuu.send(thread, "京都はどう？")  # no mention needed inside
        assert sim.bot_messages(thread)[-1] == "echo: ユウ: 京都はどう？"
        assert sent_turns(sim.api.last("messages").json)[0] == (
            "user",
            "ミナ: 旅行の計画を立てたい",
        )
    stored = await db.load_session(f"thread:{thread.id}")
    assert stored is not None and stored.session_type == "thread"
    assert stored.channel_id == general.id and stored.thread_id == thread.id
    assert [m.author_name for m in stored.messages if m.role == "user"] == ["ミナ", "ユウ"]
    # The first message lives in the channel, the rest in the thread: each knows where.
    assert [m.channel_id for m in stored.messages] == [general.id, thread.id, thread.id, thread.id]
    assert stored.messages[0].discord_message_id == first.id


async def test_a_thread_the_bot_never_joined_is_left_alone_until_mentioned(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        # A member starts a thread (SimCord has no actor verb: the REST call stands in).
        parent = sim.bot.get_channel(general.id)
        assert isinstance(parent, discord.TextChannel)
        await sim.as_moderator(
            lambda bot: parent.create_thread(name="雑談", type=discord.ChannelType.public_thread)
        )
        (thread,) = general.threads
        await mina.send(thread, "まだ呼んでない")
        assert sim.bot_messages(thread) == []
        await sim.mention(mina, thread, "ここで話そう")
        await yuu.send(thread, "続き")
        assert sim.bot_messages(thread) == ["echo: ミナ: ここで話そう", "echo: ユウ: 続き"]


async def test_long_replies_are_split_and_code_stays_fenced(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        code = "```python\n" + "\n".join(f"x_{i} = {i}" for i in range(400)) + "\n```"
        sim.api.script("messages", [Reply(text="説明します。\n\n" + code + "\n\n以上です。")])
        message = await sim.mention(sim.member(guild, "ミナ"), general, "コードを見せて")
        parts = [m for m in general.history() if m.author.bot]
        assert len(parts) >= 3
        assert parts[0].reference is not None and parts[0].reference.message_id == message.id
        assert all(p.reference is None for p in parts[1:])  # the rest follow, not replies
        for part in parts:
            assert len(part.content) <= 2000 and part.content.count("```") % 2 == 0
        # Every part is linked to the stored reply, so deleting any of them removes it.
        links = await sim.db.delete_messages(guild_id=guild.id, discord_message_ids=[parts[-1].id])
        assert links.messages == 1


async def test_an_llm_failure_gives_the_kind_message(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        sim.api.script("messages", [500])
        await sim.mention(sim.member(guild, "ミナ"), general, "こんにちは")
        assert sim.bot_messages(general) == [sim.chat.settings.llm_error_message]


async def test_a_failed_send_is_logged_and_the_turn_still_stored(
    make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    async with make_sim() as sim:
        _guild, general, mina = sim.room()
        sim.env.inject_error("POST", f"/channels/{general.id}/messages", status=500)
        await sim.mention(mina, general, "届くかな")
        assert sim.bot_messages(general) == []  # Discord refused the reply
        stored = await db.load_session(f"mention:{general.id}:{mina.id}")
        assert stored is not None and [m.content for m in stored.messages] == [
            "届くかな",
            "echo: 届くかな",
        ]


async def test_the_rate_limit_queues_then_politely_refuses(make_sim: SimFactory) -> None:
    clock = Clock()
    limiter = RateLimiter(user_per_minute=2, guild_per_minute=100, queue=1, clock=clock)
    async with make_sim(handler_kwargs={"limiter": limiter}) as sim:
        _guild, general, mina = sim.room()
        for i in range(5):
            await sim.mention(mina, general, f"m{i}")
        # Two answered at once, the third waits for its token (virtual time), two refused.
        answers = [t for t in sim.bot_messages(general) if t.startswith("echo:")]
        assert answers == ["echo: m0", "echo: m1"]
        refusals = [t for t in sim.bot_messages(general) if not t.startswith("echo:")]
        assert len(refusals) == 1  # told once, not once per message
        assert refusals[0].startswith("ごめんなさい") and "秒ほど" in refusals[0]
        await sim.env.advance_time(30)
        answers = [t for t in sim.bot_messages(general) if t.startswith("echo:")]
        assert answers == ["echo: m0", "echo: m1", "echo: m2"]
        assert sim.llm_calls() == 3


async def test_eavesdrop_joins_only_when_judged_helpful_and_respects_the_cooldown(
    make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    clock = Clock()
    tracker = EavesdropTracker(cooldown=300, judge_interval=30, clock=clock)
    async with make_sim(handler_kwargs={"eavesdrop": tracker}) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        mod = sim.member(guild, "管理人", admin=True)
        await mina.send(general, "誰か集合時間知ってる？")
        assert sim.api.requests == []  # eavesdrop is opt-in: off by default
        turned_on = await mod.slash(general, "kotonoha eavesdrop", mode="on")
        assert turned_on.response is not None
        assert turned_on.response.content.startswith("このチャンネルで eavesdrop をオンにしました")

        sim.api.script("messages", [Reply(text="no")])
        await mina.send(general, "明日の集合時間って何時だっけ")
        assert sim.bot_messages(general) == [] and sim.llm_calls() == 1  # judged: no
        await yuu.send(general, "誰かわかる？")
        assert sim.llm_calls() == 1  # judged less than 30 s ago: not asked again

        clock.now += 31
        sim.api.script("messages", [Reply(text="yes"), Reply(text="集合は10時ですよ。")])
        await mina.send(general, "困ったなあ")
        assert sim.bot_messages(general) == ["集合は10時ですよ。"]
        assert [t for _, t in sent_turns(sim.api.last("messages").json)][:1] == [
            "ミナ: 明日の集合時間って何時だっけ\n\nユウ: 誰かわかる？\n\nミナ: 困ったなあ"
        ]
        clock.now += 60  # within the 300 s cooldown: no judgment at all
        await mina.send(general, "ありがとう！")
        assert sim.llm_calls() == 3
    stored = await db.load_session(f"eavesdrop:{general.id}")
    assert stored is not None and stored.status == "active"
    assert [m.content for m in stored.messages] == [
        "明日の集合時間って何時だっけ",
        "誰かわかる？",
        "困ったなあ",
        "集合は10時ですよ。",
    ]


async def test_a_message_deleted_before_an_interjection_never_reaches_it(
    make_sim: SimFactory,
) -> None:
    clock = Clock()
    tracker = EavesdropTracker(cooldown=300, judge_interval=30, clock=clock)
    async with make_sim(handler_kwargs={"eavesdrop": tracker}) as sim:
        guild, general, mina = sim.room()
        await sim.chat.set_eavesdrop(guild.id, general.id, True)
        sim.api.script("messages", [Reply(text="no")])
        oops = await mina.send(general, "間違えて書いた暗証番号4321")
        await mina.delete(oops)
        await mina.send(general, "ところで集合は何時？")  # judged less than 30 s ago: waits
        clock.now += 31
        sim.api.script("messages", [Reply(text="yes"), Reply(text="10時です")])
        await mina.send(general, "だれか教えて")
        assert sim.bot_messages(general) == ["10時です"]
        assert "4321" not in sim.prompt()


async def test_eavesdrop_opt_in_survives_a_restart_and_can_be_turned_off(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    guild_id, channel_id = 500, 777
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as service:
        await service.set_eavesdrop(guild_id, channel_id, True)
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as restarted:
        assert restarted.eavesdrop_enabled(channel_id) is False  # not loaded yet
        assert await restarted.load_eavesdrop_channels() == {channel_id}
        assert restarted.eavesdrop_enabled(channel_id)
        await restarted.set_eavesdrop(guild_id, channel_id, False)
        assert not restarted.eavesdrop_enabled(channel_id)
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as again:
        assert await again.load_eavesdrop_channels() == set()


@pytest.mark.parametrize("content_intent", [False])
async def test_without_the_content_intent_mentions_still_work(
    make_sim: SimFactory, content_intent: bool
) -> None:
    async with make_sim(discord_message_content=content_intent) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        await sim.mention(sim.member(guild, "ミナ"), general, "聞こえる？")
        # Discord still sends the content of messages that mention the bot.
        assert sim.bot_messages(general) == ["echo: 聞こえる？"]


async def test_a_thread_that_cannot_be_opened_falls_back_to_the_channel(
    make_sim: SimFactory,
) -> None:
    async with make_sim(discord_mention_thread=True) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        sim.env.inject_error("POST", f"/channels/{general.id}/messages/*/threads", status=403)
        await sim.mention(sim.member(guild, "ミナ"), general, "スレッドにして")
        assert general.threads == []
        assert sim.bot_messages(general) == ["echo: スレッドにして"]


async def test_deleting_one_message_of_an_eavesdrop_turn_takes_the_interjection(
    make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    clock = Clock()
    tracker = EavesdropTracker(cooldown=300, judge_interval=30, clock=clock)
    async with make_sim(handler_kwargs={"eavesdrop": tracker}) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        await sim.chat.set_eavesdrop(guild.id, general.id, True)
        sim.api.script("messages", [Reply(text="no")])
        first = await mina.send(general, "部室の鍵の番号は5555")
        await yuu.send(general, "鍵どこ？")
        clock.now += 31
        sim.api.script("messages", [Reply(text="yes"), Reply(text="番号は5555ですよ")])
        await mina.send(general, "だれか知ってる？")
        assert sim.bot_messages(general) == ["番号は5555ですよ"]
        await mina.delete(first)
    stored = await db.load_session(f"eavesdrop:{general.id}")
    assert stored is not None
    assert [m.content for m in stored.messages] == ["鍵どこ？", "だれか知ってる？"]
