"""The message handler with fake Discord objects, real storage and the real SDKs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from kotonoha_bot.bot import texts
from kotonoha_bot.bot.eavesdrop import EavesdropTracker
from kotonoha_bot.bot.handler import MessageHandler, clean_content, thread_name
from kotonoha_bot.bot.ratelimit import RateLimiter
from kotonoha_bot.chat import ChatService
from kotonoha_bot.db import DatabaseProtocol
from tests.bot.fakes import FakeChannel, FakeGuild, FakeMessage, FakeUser
from tests.chat.support import add_document, chat_service, chat_settings, request_text, sent_turns
from tests.fakes.api_server import FakeAPIServer, Reply, fake_api_fixture

fake_api = fake_api_fixture()

BOT = FakeUser(1, "kotonoha", bot=True)
GUILD = FakeGuild(500)
MINA = FakeUser(101, "ミナ")
YUU = FakeUser(102, "ユウ")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, service: ChatService, **handler_kwargs: Any) -> None:
        self.service = service
        self.sleeps: list[float] = []
        self.clock = Clock()

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        kwargs: dict[str, Any] = {
            "bot_user_id": lambda: BOT.id,
            "sleep": sleep,
            "eavesdrop": EavesdropTracker(cooldown=300, judge_interval=30, clock=self.clock),
        }
        kwargs.update(handler_kwargs)
        self.handler = MessageHandler(service, service.settings, **kwargs)

    async def send(self, message: FakeMessage) -> None:
        await self.handler.handle(message)  # type: ignore[arg-type]


def mention(text: str, channel: FakeChannel, author: FakeUser = MINA) -> FakeMessage:
    return FakeMessage(
        content=f"<@{BOT.id}> {text}", channel=channel, author=author, guild=GUILD, mentions=[BOT]
    )


def plain(text: str, channel: FakeChannel, author: FakeUser = MINA) -> FakeMessage:
    return FakeMessage(content=text, channel=channel, author=author, guild=GUILD)


@pytest.fixture
async def harness(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> AsyncIterator[Harness]:
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as service:
        yield Harness(service)


def test_clean_content_and_thread_names() -> None:
    other = FakeUser(7, "ユウ")
    assert clean_content(f"<@{BOT.id}> hi <@!{BOT.id}> <@7>", BOT.id, [BOT, other]) == "hi  @ユウ"
    assert thread_name("一行目\n二行目") == "一行目"
    assert thread_name("") == texts.THREAD_NAME_FALLBACK
    assert len(thread_name("あ" * 100)) == 40


async def test_mention_gets_a_reply_while_typing_and_is_stored(
    harness: Harness, fake_api: FakeAPIServer, db: DatabaseProtocol
) -> None:
    channel = FakeChannel()
    message = mention("こんにちは", channel)
    await harness.send(message)
    assert message.replies == ["echo: こんにちは"]
    assert channel.typing_entered == 1
    stored = await db.load_session(f"mention:{channel.id}:{MINA.id}")
    assert stored is not None
    assert [(m.role, m.content) for m in stored.messages] == [
        ("user", "こんにちは"),
        ("assistant", "echo: こんにちは"),
    ]
    assert stored.messages[0].discord_message_id == message.id
    assert stored.guild_id == GUILD.id and stored.channel_id == channel.id


async def test_a_reply_to_the_bot_counts_as_a_mention(harness: Harness) -> None:
    channel = FakeChannel()
    bot_message = FakeMessage(content="前の返事", channel=channel, author=BOT, guild=GUILD)
    message = plain("つづき", channel)
    message.reference = type("Ref", (), {"resolved": bot_message})()
    await harness.send(message)
    assert message.replies == ["echo: つづき"]


async def test_ignored_messages(harness: Harness, fake_api: FakeAPIServer) -> None:
    channel = FakeChannel()
    await harness.send(plain("独り言", channel))  # no mention, no eavesdrop
    await harness.send(
        FakeMessage(f"<@{BOT.id}> hi", channel, FakeUser(9, "other bot", True), GUILD, [BOT])
    )
    join = mention("hi", channel)
    join.type = discord.MessageType.new_member
    await harness.send(join)
    assert channel.sent == []
    assert fake_api.requests == []


async def test_bare_mention_is_greeted_without_the_llm(
    harness: Harness, fake_api: FakeAPIServer
) -> None:
    channel = FakeChannel()
    await harness.send(mention("", channel))
    assert channel.sent == [texts.GREETING]
    assert fake_api.requests == []


async def test_dm_uses_no_guild_knowledge(
    harness: Harness, fake_api: FakeAPIServer, db: DatabaseProtocol
) -> None:
    await add_document(harness.service, GUILD.id, "g.md", "# 秘密\n秘密の合言葉はORCHIDです")
    dm = FakeChannel(type=discord.ChannelType.private)
    message = FakeMessage(content="秘密の合言葉は？", channel=dm, author=MINA, guild=None)
    await harness.send(message)
    assert message.replies == ["echo: 秘密の合言葉は？"]
    assert "ORCHID" not in request_text(fake_api.last("messages").json)
    assert await db.load_session(f"dm:{dm.id}") is not None


async def test_mention_opens_a_thread_that_continues_without_mentions(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    settings = chat_settings(tmp_path, discord_mention_thread=True)
    async with chat_service(db, fake_api, settings) as service:
        h = Harness(service)
        channel = FakeChannel()
        first = mention("旅行の計画を立てたい", channel)
        await h.send(first)
        assert channel.sent == [] and len(first.threads) == 1
        thread = first.threads[0]
        assert thread.name == "旅行の計画を立てたい"  # type: ignore[attr-defined]
        assert thread.sent == ["echo: ミナ: 旅行の計画を立てたい"]  # threads name speakers
        # Someone else continues in the thread without mentioning the bot.
        await h.send(plain("京都はどう？", thread, author=YUU))
        assert thread.sent[-1] == "echo: ユウ: 京都はどう？"
        # A thread the bot never joined is left alone.
        other = FakeChannel(type=discord.ChannelType.public_thread, parent_id=channel.id)
        await h.send(plain("関係ない話", other))
        assert other.sent == []
    stored = await db.load_session(f"thread:{thread.id}")
    assert stored is not None and stored.session_type == "thread"
    assert stored.channel_id == channel.id and stored.thread_id == thread.id
    assert [m.author_name for m in stored.messages if m.role == "user"] == ["ミナ", "ユウ"]
    assert sent_turns(fake_api.last("messages").json)[0] == ("user", "ミナ: 旅行の計画を立てたい")


async def test_mention_inside_a_thread_adopts_the_thread(harness: Harness) -> None:
    thread = FakeChannel(type=discord.ChannelType.public_thread, parent_id=42)
    await harness.send(plain("まだ呼んでない", thread))  # ignored (and remembered as unknown)
    assert thread.sent == []
    await harness.send(mention("ここで話そう", thread))
    await harness.send(plain("続き", thread, author=YUU))
    assert thread.sent == ["echo: ミナ: ここで話そう", "echo: ユウ: 続き"]


async def test_long_replies_are_split_and_code_stays_fenced(
    harness: Harness, fake_api: FakeAPIServer
) -> None:
    code = "```python\n" + "\n".join(f"x_{i} = {i}" for i in range(400)) + "\n```"
    fake_api.script("messages", [Reply(text="説明します。\n\n" + code + "\n\n以上です。")])
    channel = FakeChannel()
    message = mention("コードを見せて", channel)
    await harness.send(message)
    assert len(channel.sent) >= 3
    assert message.replies == channel.sent[:1]  # the first part replies, the rest follow
    for part in channel.sent:
        assert len(part) <= 2000
        assert part.count("```") % 2 == 0
    assert channel.typing_entered == 1


async def test_llm_failure_gives_the_kind_message(
    harness: Harness, fake_api: FakeAPIServer
) -> None:
    fake_api.script("messages", [500])
    channel = FakeChannel()
    message = mention("こんにちは", channel)
    await harness.send(message)
    assert message.replies == [harness.service.settings.llm_error_message]


async def test_rate_limit_queues_then_politely_refuses(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as service:
        clock = Clock()
        limiter = RateLimiter(user_per_minute=2, guild_per_minute=100, queue=1, clock=clock)
        h = Harness(service, limiter=limiter)
        channel = FakeChannel()
        for i in range(5):
            await h.send(mention(f"m{i}", channel))
        assert h.sleeps == [pytest.approx(30.0)]  # the third waited for its token
        answers = [s for s in channel.sent if s.startswith("echo:")]
        assert answers == ["echo: m0", "echo: m1", "echo: m2"]
        refusals = [s for s in channel.sent if not s.startswith("echo:")]
        assert len(refusals) == 1  # told once, not once per message
        assert refusals[0].startswith("ごめんなさい") and "秒ほど" in refusals[0]
        assert len(fake_api.requests_for("messages")) == 3


async def test_eavesdrop_joins_only_when_judged_helpful_and_respects_the_cooldown(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    channel = FakeChannel()
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as service:
        h = Harness(service)
        await h.send(plain("誰か集合時間知ってる？", channel))
        assert fake_api.requests == []  # eavesdrop is opt-in: off by default
        await service.set_eavesdrop(GUILD.id, channel.id, True)

        fake_api.script("messages", [Reply(text="no")])
        await h.send(plain("明日の集合時間って何時だっけ", channel))
        assert channel.sent == [] and len(fake_api.requests) == 1  # judged: no

        await h.send(plain("誰かわかる？", channel, author=YUU))
        assert len(fake_api.requests) == 1  # judged less than 30 s ago: not asked again

        h.clock.now += 31
        fake_api.script("messages", [Reply(text="yes"), Reply(text="集合は10時ですよ。")])
        await h.send(plain("困ったなあ", channel))
        assert channel.sent == ["集合は10時ですよ。"]
        interjection = fake_api.last("messages").json
        assert [t for _, t in sent_turns(interjection)][:1] == [
            "ミナ: 明日の集合時間って何時だっけ\n\nユウ: 誰かわかる？\n\nミナ: 困ったなあ"
        ]

        h.clock.now += 60  # within the 300 s cooldown: no judgment at all
        await h.send(plain("ありがとう！", channel))
        assert len(fake_api.requests) == 3

    stored = await db.load_session(f"eavesdrop:{channel.id}")
    assert stored is not None and stored.status == "active"
    assert [m.content for m in stored.messages] == [
        "明日の集合時間って何時だっけ",
        "誰かわかる？",
        "困ったなあ",
        "集合は10時ですよ。",
    ]


async def test_eavesdrop_opt_in_survives_a_restart_and_can_be_turned_off(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    channel_id = 777
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as service:
        await service.set_eavesdrop(GUILD.id, channel_id, True)
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as restarted:
        assert restarted.eavesdrop_enabled(channel_id) is False  # not loaded yet
        assert await restarted.load_eavesdrop_channels() == {channel_id}
        assert restarted.eavesdrop_enabled(channel_id)
        await restarted.set_eavesdrop(GUILD.id, channel_id, False)
        assert not restarted.eavesdrop_enabled(channel_id)
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as again:
        assert await again.load_eavesdrop_channels() == set()
