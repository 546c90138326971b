"""Slash commands through the cogs' callbacks with fake interactions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
from discord import app_commands

from kotonoha_bot.bot import texts
from kotonoha_bot.bot.client import KotonohaBot
from kotonoha_bot.bot.cogs import AdminCog, ChatCog, KnowledgeCog
from kotonoha_bot.chat import ChatService, Conversation, Incoming
from kotonoha_bot.db import DatabaseProtocol
from tests.bot.fakes import FakeChannel, FakeInteraction, FakePermissions, FakeUser
from tests.chat.support import add_document, chat_service, chat_settings, sent_turns
from tests.fakes.api_server import FakeAPIServer, fake_api_fixture

fake_api = fake_api_fixture()

GUILD = 900
MINA = FakeUser(201, "ミナ")
ADMIN = FakeUser(202, "管理人")


@pytest.fixture
async def bot(
    db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> AsyncIterator[KotonohaBot]:
    async with chat_service(db, fake_api, chat_settings(tmp_path)) as service:
        client = KotonohaBot(service, service.settings, sync_commands=False)
        await client.add_features()
        yield client


def cog(bot: KotonohaBot, kind: type[Any]) -> Any:
    found = [c for c in bot.cogs.values() if isinstance(c, kind)]
    assert len(found) == 1
    return found[0]


async def call(command: Any, cog_instance: Any, interaction: FakeInteraction, **kw: Any) -> None:
    await command.callback(cog_instance, interaction, **kw)


def said(text: str, user: FakeUser = MINA) -> list[Incoming]:
    return [Incoming(text=text, author_id=user.id, author_name=user.display_name)]


async def test_every_command_is_registered_with_help(bot: KotonohaBot) -> None:
    groups = {c.name: c for c in bot.tree.get_commands()}
    assert set(groups) == {"chat", "kb", "kotonoha"}
    names = {
        f"{g.name} {c.name}"
        for g in groups.values()
        if isinstance(g, app_commands.Group)
        for c in g.commands
    }
    assert names == {"chat reset", "chat status", "kb search", "kb forget", "kotonoha eavesdrop"}
    for group in groups.values():
        assert isinstance(group, app_commands.Group) and group.description
        for command in group.commands:
            assert command.description and command.description != "…", command.name
            for param in command.parameters:
                assert param.description and param.description != "…", (command.name, param.name)


async def test_chat_status_and_reset(bot: KotonohaBot, fake_api: FakeAPIServer) -> None:
    chat: ChatService = bot.chat
    channel = FakeChannel()
    status, reset = cog(bot, ChatCog).status, cog(bot, ChatCog).reset
    inter = FakeInteraction(user=MINA, channel=channel, guild_id=GUILD)
    await call(status, cog(bot, ChatCog), inter)
    assert inter.answers == [(texts.STATUS_NONE, True)]

    await add_document(chat, GUILD, "faq.md", "# 図書室\n図書室は五時に閉まります")
    conv = Conversation.mention(GUILD, channel.id, MINA.id)
    await chat.respond(conv, said("図書室は何時に閉まる？"))
    inter = FakeInteraction(user=MINA, channel=channel, guild_id=GUILD)
    await call(status, cog(bot, ChatCog), inter)
    ((text, ephemeral),) = inter.answers
    assert ephemeral
    assert "2件（リセット後 2件）" in text and "<t:" in text
    assert "前回の返事で使った知識: 1件" in text
    assert "eavesdrop: オフ" in text

    inter = FakeInteraction(user=MINA, channel=channel, guild_id=GUILD)
    await call(reset, cog(bot, ChatCog), inter)
    assert inter.answers == [(texts.RESET_DONE, True)]
    await chat.respond(conv, said("はじめまして"))
    turns = sent_turns(fake_api.last("messages").json)
    # Nothing in the knowledge base is about a greeting: no reference at all (the floor).
    assert len(turns) == 1 and turns[0][1] == "はじめまして"
    assert "何時に閉まる" not in turns[0][1]  # the history before the reset is gone


async def test_kb_search_is_ephemeral_and_guild_scoped(bot: KotonohaBot) -> None:
    chat: ChatService = bot.chat
    await add_document(chat, GUILD, "faq.md", "# 図書室\n図書室は五時に閉まります")
    await add_document(chat, GUILD + 1, "other.md", "# 図書室\n図書室はORCHID棟にあります")
    search = cog(bot, KnowledgeCog).search
    inter = FakeInteraction(user=MINA, channel=FakeChannel(), guild_id=GUILD)
    await call(search, cog(bot, KnowledgeCog), inter, query="図書室", top_k=None)
    ((text, ephemeral),) = inter.answers
    assert ephemeral and "五時に閉まります" in text and "ORCHID" not in text

    dm = FakeInteraction(
        user=MINA, channel=FakeChannel(type=discord.ChannelType.private), guild_id=None
    )
    await call(search, cog(bot, KnowledgeCog), dm, query="図書室", top_k=None)
    assert dm.answers == [(texts.SEARCH_DM, True)]


async def test_kb_forget_me_deletes_my_messages_and_derived_knowledge(
    bot: KotonohaBot, db: DatabaseProtocol
) -> None:
    chat: ChatService = bot.chat
    channel = FakeChannel()
    thread = Conversation.thread(GUILD, channel.id, 4242)
    await chat.respond(thread, said("わたしの住所は秘密です"))
    await chat.respond(thread, said("こんにちは", user=ADMIN))
    forget = cog(bot, KnowledgeCog).forget
    inter = FakeInteraction(user=MINA, channel=channel, guild_id=GUILD)
    await call(forget, cog(bot, KnowledgeCog), inter, scope="me", confirm=False)
    ((text, ephemeral),) = inter.answers
    assert ephemeral and text.startswith("あなたのメッセージ 1件")
    stored = await db.load_session(thread.session_key)
    assert stored is not None
    assert all(m.author_id != MINA.id for m in stored.messages)
    assert any(m.author_id == ADMIN.id for m in stored.messages)


async def test_kb_forget_guild_needs_admin_and_confirmation(
    bot: KotonohaBot, db: DatabaseProtocol
) -> None:
    chat: ChatService = bot.chat
    channel = FakeChannel()
    conv = Conversation.mention(GUILD, channel.id, MINA.id)
    await chat.respond(conv, said("覚えておいて"))
    await add_document(chat, GUILD, "faq.md", "# FAQ\n答え")
    forget, kb = cog(bot, KnowledgeCog).forget, cog(bot, KnowledgeCog)

    member = FakeInteraction(user=MINA, channel=channel, guild_id=GUILD)
    await call(forget, kb, member, scope="guild", confirm=True)
    assert member.answers == [(texts.FORGET_NEEDS_ADMIN, True)]

    admin_perms = FakePermissions(manage_guild=True)
    unconfirmed = FakeInteraction(
        user=ADMIN, channel=channel, guild_id=GUILD, permissions=admin_perms
    )
    await call(forget, kb, unconfirmed, scope="guild", confirm=False)
    assert "confirm: True" in unconfirmed.answers[0][0]
    assert await db.load_session(conv.session_key) is not None

    admin = FakeInteraction(user=ADMIN, channel=channel, guild_id=GUILD, permissions=admin_perms)
    await call(forget, kb, admin, scope="guild", confirm=True)
    assert admin.answers[0][0].startswith("このサーバーのデータを削除しました")
    assert await db.load_session(conv.session_key) is None
    assert await db.list_sources(guild_id=GUILD) == []
    # The pipeline carries on after the cached session was dropped.
    reply = await chat.respond(conv, said("また話そう"))
    assert reply.ok
    stored = await db.load_session(conv.session_key)
    assert stored is not None and stored.messages[0].content == "また話そう"


async def test_kb_forget_in_a_dm_deletes_the_dm(bot: KotonohaBot, db: DatabaseProtocol) -> None:
    dm_channel = FakeChannel(type=discord.ChannelType.private)
    await bot.chat.respond(Conversation.dm(dm_channel.id, MINA.id), said("内緒の話"))
    inter = FakeInteraction(user=MINA, channel=dm_channel, guild_id=None)
    await call(
        cog(bot, KnowledgeCog).forget, cog(bot, KnowledgeCog), inter, scope="me", confirm=False
    )
    assert inter.answers == [(texts.FORGET_DM_DONE, True)]
    assert await db.load_session(f"dm:{dm_channel.id}") is None


async def test_eavesdrop_command_needs_manage_channels(bot: KotonohaBot) -> None:
    admin_cog = cog(bot, AdminCog)
    channel = FakeChannel()
    member = FakeInteraction(user=MINA, channel=channel, guild_id=GUILD)
    await call(admin_cog.eavesdrop, admin_cog, member, mode="on")
    assert member.answers == [(texts.EAVESDROP_NEEDS_PERMISSION, True)]
    assert not bot.chat.eavesdrop_enabled(channel.id)

    perms = FakePermissions(manage_channels=True)
    mod = FakeInteraction(user=ADMIN, channel=channel, guild_id=GUILD, permissions=perms)
    await call(admin_cog.eavesdrop, admin_cog, mod, mode="on")
    assert mod.answers[0][0].startswith("このチャンネルで eavesdrop をオンにしました")
    assert bot.chat.eavesdrop_enabled(channel.id)

    thread = FakeChannel(type=discord.ChannelType.public_thread, parent_id=channel.id)
    in_thread = FakeInteraction(user=ADMIN, channel=thread, guild_id=GUILD, permissions=perms)
    await call(admin_cog.eavesdrop, admin_cog, in_thread, mode="on")
    assert in_thread.answers == [(texts.EAVESDROP_GUILD_ONLY, True)]

    off = FakeInteraction(user=ADMIN, channel=channel, guild_id=GUILD, permissions=perms)
    await call(admin_cog.eavesdrop, admin_cog, off, mode="off")
    assert off.answers == [(texts.EAVESDROP_OFF, True)]
    assert not bot.chat.eavesdrop_enabled(channel.id)
