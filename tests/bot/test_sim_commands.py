"""Slash commands through discord.py's real app-command tree on a simulated Discord.

The bot syncs its tree at startup (SimCord refuses a command that was never synced,
as Discord does); members invoke commands as a user could, with real roles and
permissions, and what they see (ephemeral or not) is what is asserted.
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands

from kotonoha_bot.bot import texts
from kotonoha_bot.db import DatabaseProtocol
from tests.bot.sim import SimFactory
from tests.chat.support import add_document, sent_turns

COMMANDS = {
    "chat reset",
    "chat status",
    "kb search",
    "kb forget",
    "kb add",
    "memory add",
    "memory list",
    "memory delete",
    "memory why",
    "kotonoha eavesdrop",
    "kotonoha usage",
}


def answer(result: Any) -> str:
    """The text a member sees: the response, or the follow-up after a deferral."""
    if result.followups:
        return str(result.followups[-1].content)
    assert result.response is not None
    return str(result.response.content)


async def test_every_command_is_synced_with_help_and_shown_by_permission(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        groups = {c.name: c for c in sim.bot.tree.get_commands()}
        assert set(groups) == {"chat", "kb", "memory", "kotonoha"}
        names = {
            f"{g.name} {c.name}"
            for g in groups.values()
            if isinstance(g, app_commands.Group)
            for c in g.commands
        }
        assert names == COMMANDS
        for group in groups.values():
            assert isinstance(group, app_commands.Group) and group.description
            for command in group.commands:
                assert command.description and command.description != "…", command.name
                for param in command.parameters:
                    assert param.description and param.description != "…", (
                        command.name,
                        param.name,
                    )
        guild = sim.guild()
        general = guild.create_text_channel("general")
        member, admin = sim.member(guild, "ミナ"), sim.member(guild, "管理人", admin=True)
        # The admin group is hidden from members (default permissions), shown to admins.
        assert set(admin.available_commands(general)) == COMMANDS
        assert set(member.available_commands(general)) == {
            c for c in COMMANDS if not c.startswith("kotonoha")
        }


async def test_chat_status_and_reset(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        guild, general, mina = sim.room()
        status = await mina.slash(general, "chat status")
        assert status.ephemeral and answer(status) == texts.STATUS_NONE

        await add_document(sim.chat, guild.id, "faq.md", "# 図書室\n図書室は五時に閉まります")
        await sim.mention(mina, general, "図書室は何時に閉まる？")
        status = await mina.slash(general, "chat status")
        text = answer(status)
        assert status.ephemeral
        assert "2件（リセット後 2件）" in text and "<t:" in text
        assert "前回の返事で使った知識: 1件" in text and "eavesdrop: オフ" in text

        reset = await mina.slash(general, "chat reset")
        assert reset.ephemeral and answer(reset) == texts.RESET_DONE
        await sim.mention(mina, general, "はじめまして")
        turns = sent_turns(sim.api.last("messages").json)
        # Nothing in the knowledge base is about a greeting: no reference at all (the floor).
        assert len(turns) == 1 and turns[0][1].endswith("はじめまして")
        assert "<reference" not in turns[0][1]
        assert "何時に閉まる" not in turns[0][1]  # the history before the reset is gone


async def test_kb_search_is_ephemeral_and_guild_scoped(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        guild, other = sim.guild("A"), sim.guild("B")
        general = guild.create_text_channel("general")
        mina = sim.member(guild, "ミナ")
        await add_document(sim.chat, guild.id, "faq.md", "# 図書室\n図書室は五時に閉まります")
        await add_document(sim.chat, other.id, "other.md", "# 図書室\n図書室はORCHID棟にあります")
        result = await mina.slash(general, "kb search", query="図書室")
        assert result.ephemeral
        assert "五時に閉まります" in answer(result) and "ORCHID" not in answer(result)
        dm = await mina.user.slash("kb search", query="図書室")
        assert answer(dm) == texts.SEARCH_DM


async def test_kb_forget_guild_needs_admin_and_confirmation(
    make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, admin = sim.member(guild, "ミナ"), sim.member(guild, "管理人", admin=True)
        await sim.mention(mina, general, "覚えておいて")
        await add_document(sim.chat, guild.id, "faq.md", "# FAQ\n答え")
        key = f"mention:{general.id}:{mina.id}"

        refused = await mina.slash(general, "kb forget", scope="guild", confirm=True)
        assert answer(refused) == texts.FORGET_NEEDS_ADMIN
        unconfirmed = await admin.slash(general, "kb forget", scope="guild")
        assert "confirm: True" in answer(unconfirmed)
        assert await db.load_session(key) is not None

        done = await admin.slash(general, "kb forget", scope="guild", confirm=True)
        assert done.ephemeral and answer(done).startswith("このサーバーのデータを削除しました")
        assert await db.load_session(key) is None
        assert await db.list_sources(guild_id=guild.id) == []
        # The pipeline carries on after the cached session was dropped.
        await sim.mention(mina, general, "また話そう")
        stored = await db.load_session(key)
        assert stored is not None and stored.messages[0].content == "また話そう"


async def test_kb_forget_in_a_dm_deletes_the_dm_and_its_memories(
    make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        mina = sim.member(guild, "ミナ")
        await mina.user.send_dm("内緒の話")
        await mina.user.slash("memory add", text="DMのメモ")
        result = await mina.user.slash("kb forget")
        assert answer(result) == texts.FORGET_DM_DONE
        assert await db.load_session(f"dm:{mina.user.dm_channel.id}") is None
        assert await db.list_memories(guild_id=None, user_id=mina.id) == []


async def test_eavesdrop_command_needs_manage_channels_and_a_text_channel(
    make_sim: SimFactory,
) -> None:
    async with make_sim(discord_mention_thread=True) as sim:
        guild, general, mina = sim.room()
        moderator = guild.add_member(
            sim.env.create_user("mod", global_name="モデレーター"),
            roles=[
                guild.create_role("mods", permissions=discord.Permissions(manage_channels=True))
            ],
        )
        assert "kotonoha eavesdrop" not in mina.available_commands(general)
        on = await moderator.slash(general, "kotonoha eavesdrop", mode="on")
        assert on.ephemeral and answer(on).startswith("このチャンネルで eavesdrop をオンにしました")
        assert sim.chat.eavesdrop_enabled(general.id)

        await sim.mention(mina, general, "スレッドで話そう")
        (thread,) = general.threads
        in_thread = await moderator.slash(thread, "kotonoha eavesdrop", mode="on")
        assert answer(in_thread) == texts.EAVESDROP_GUILD_ONLY

        off = await moderator.slash(general, "kotonoha eavesdrop", mode="off")
        assert answer(off) == texts.EAVESDROP_OFF
        assert not sim.chat.eavesdrop_enabled(general.id)
