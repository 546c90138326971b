"""``/memory add|list|delete|why``: memories a user curates, and why the bot answered so.

Every answer is ephemeral (only the caller sees it). In a guild a memory belongs to
the caller in that guild; in a DM it is private to the caller's DMs. ``list`` shows
only the caller's own memories; ``delete`` removes one of the caller's own, or — for a
member with Manage Server — any memory of that guild (never anyone's DM memories).
"""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from kotonoha_bot.bot import texts
from kotonoha_bot.bot.split import DISCORD_LIMIT
from kotonoha_bot.chat.service import ChatService
from kotonoha_bot.chat.why import Explanation
from kotonoha_bot.errors import KotonohaError, MemoryLimitError

log = logging.getLogger("kotonoha_bot.bot")

#: Characters of a memory shown per line in ``/memory list`` and ``why``.
MEMORY_LINE_CHARS = 120


def _line(text: str, limit: int = MEMORY_LINE_CHARS) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


def format_explanation(ex: Explanation, limit: int = DISCORD_LIMIT) -> str:
    """``/memory why`` as one Discord message."""
    t = ex.trace
    lines = [
        texts.WHY_HEAD.format(at=int(t.at.timestamp())),
        texts.WHY_HISTORY.format(used=t.history_messages, total=t.session_messages),
    ]
    if ex.references:
        lines.append(texts.WHY_REFS.format(count=len(ex.references)))
        for i, ref in enumerate(ex.references, 1):
            where = f" <{ref.link.url}>" if ref.link else ""
            gone = f" {texts.WHY_REF_GONE}" if ref.gone else ""
            lines.append(f"  {i}. {ref.label} ({ref.score:.3f}){where}{gone}")
    else:
        lines.append(texts.WHY_REFS_NONE)
    if t.judge == "judged":
        lines.append(texts.WHY_JUDGED.format(out=len(t.judged_out)))
        lines += [texts.WHY_JUDGED_OUT.format(label=r.label, score=r.score) for r in t.judged_out]
    elif t.judge != "off":
        cause = texts.WHY_UNJUDGED_CAUSES.get(t.judge, t.judge)
        lines.append(texts.WHY_UNJUDGED.format(cause=cause))
    if ex.memories or ex.memories_deleted:
        lines.append(texts.WHY_MEMORIES.format(count=len(ex.memories) + ex.memories_deleted))
        lines += [f"  - #{m.memory_id} {_line(m.content)}" for m in ex.memories]
        if ex.memories_deleted:
            lines.append(texts.WHY_MEMORIES_DELETED.format(count=ex.memories_deleted))
    else:
        lines.append(texts.WHY_MEMORIES_NONE)
    lines.append(
        texts.WHY_TOKENS.format(input=t.input_tokens, output=t.output_tokens, model=t.model)
    )
    out = "\n".join(lines)
    return out if len(out) <= limit else out[: limit - 1] + "…"


class MemoryCog(
    commands.GroupCog, group_name="memory", group_description="ことはに覚えてもらうこと"
):
    """``/memory add``, ``list``, ``delete`` and ``why``."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        super().__init__()

    @app_commands.command(name="add")
    @app_commands.describe(text="覚えておいてほしいこと（あなたとの会話でだけ使います）")
    async def add(self, interaction: discord.Interaction[Any], text: str) -> None:
        """Tell kotonoha something to remember about you (used only in your own turns)."""
        limit = self.chat.settings.memory_max_chars
        clean = " ".join(text.split())
        if not clean:
            await interaction.response.send_message(texts.MEMORY_EMPTY, ephemeral=True)
            return
        if len(clean) > limit:
            await interaction.response.send_message(
                texts.MEMORY_TOO_LONG.format(length=len(clean), limit=limit), ephemeral=True
            )
            return
        try:
            memory = await self.chat.memories.add(interaction.guild_id, interaction.user.id, text)
        except MemoryLimitError:
            answer = texts.MEMORY_FULL.format(limit=self.chat.settings.memory_max_per_user)
        except KotonohaError as exc:
            log.error("/memory add failed: %s", exc)
            answer = texts.INTERNAL_ERROR
        else:
            answer = texts.MEMORY_ADDED.format(id=memory.memory_id, text=_line(memory.content))
        await interaction.response.send_message(answer, ephemeral=True)

    @app_commands.command(name="list")
    async def list_(self, interaction: discord.Interaction[Any]) -> None:
        """Show what kotonoha remembers about you here (only you see it)."""
        try:
            mine = await self.chat.memories.mine(interaction.guild_id, interaction.user.id)
        except KotonohaError as exc:
            log.error("/memory list failed: %s", exc)
            await interaction.response.send_message(texts.INTERNAL_ERROR, ephemeral=True)
            return
        if not mine:
            await interaction.response.send_message(texts.MEMORY_LIST_EMPTY, ephemeral=True)
            return
        lines = [texts.MEMORY_LIST_HEAD.format(count=len(mine))]
        for i, memory in enumerate(mine):
            entry = f"- #{memory.memory_id} {_line(memory.content)}"
            if sum(len(x) + 1 for x in lines) + len(entry) > DISCORD_LIMIT - 40:
                lines.append(texts.MEMORY_LIST_MORE.format(more=len(mine) - i))
                break
            lines.append(entry)
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="delete")
    @app_commands.describe(id="忘れてほしい記憶の番号（/memory list の #）")
    async def delete(self, interaction: discord.Interaction[Any], id: int) -> None:
        """Make kotonoha forget one memory (admins: any memory of this server)."""
        admin = interaction.guild_id is not None and interaction.permissions.manage_guild
        try:
            deleted = await self.chat.memories.delete(
                id, guild_id=interaction.guild_id, user_id=interaction.user.id, admin=admin
            )
        except KotonohaError as exc:
            log.error("/memory delete failed: %s", exc)
            await interaction.response.send_message(texts.INTERNAL_ERROR, ephemeral=True)
            return
        if deleted:
            log.info(
                "/memory delete #%d in guild %s by user %d%s",
                id,
                interaction.guild_id,
                interaction.user.id,
                " (admin)" if admin else "",
            )
        text = texts.MEMORY_DELETED if deleted else texts.MEMORY_NOT_FOUND
        await interaction.response.send_message(text.format(id=id), ephemeral=True)

    @app_commands.command(name="why")
    async def why(self, interaction: discord.Interaction[Any]) -> None:
        """Show what kotonoha's last answer to you used: history, knowledge, your memories."""
        try:
            ex = await self.chat.explain_last_answer(interaction.guild_id, interaction.user.id)
        except KotonohaError as exc:
            log.error("/memory why failed: %s", exc)
            await interaction.response.send_message(texts.INTERNAL_ERROR, ephemeral=True)
            return
        text = texts.WHY_NONE if ex is None else format_explanation(ex)
        await interaction.response.send_message(text, ephemeral=True)
