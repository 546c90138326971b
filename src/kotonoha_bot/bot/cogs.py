"""One cog per feature: conversation events, ``/chat``, ``/kb`` and ``/kotonoha``.

(``/memory`` is :mod:`kotonoha_bot.bot.memory_cog`; edits and deletes are followed by
:mod:`kotonoha_bot.bot.events`; ``/kb add`` does its work in
:mod:`kotonoha_bot.bot.attachments`.)

Slash-command help comes from the docstrings and ``@app_commands.describe``. Every
command answers ephemerally (only the caller sees it) except ``/chat reset``, whose
effect everyone in a thread shares. The cogs hold no state of their own: they get
the :class:`~kotonoha_bot.chat.service.ChatService` and the handler from the bot.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from kotonoha_bot.bot import texts
from kotonoha_bot.bot.attachments import add_attachment
from kotonoha_bot.bot.handler import THREAD_TYPES, MessageHandler
from kotonoha_bot.bot.split import DISCORD_LIMIT
from kotonoha_bot.chat.conversation import Conversation
from kotonoha_bot.chat.prompt import describe_source
from kotonoha_bot.chat.service import ChatService
from kotonoha_bot.chat.usage import Totals, UsageSummary
from kotonoha_bot.config import Settings
from kotonoha_bot.errors import KotonohaError

if TYPE_CHECKING:
    from kotonoha_bot.knowledge.search import RankedHit
    from kotonoha_bot.models import MessageLink

log = logging.getLogger("kotonoha_bot.bot")

SNIPPET_CHARS = 180


def conversation_for(interaction: discord.Interaction[Any]) -> Conversation:
    """The conversation a command refers to: this DM, this thread, or my mentions here."""
    channel: Any = interaction.channel
    channel_id = interaction.channel_id or 0
    if interaction.guild_id is None:
        return Conversation.dm(channel_id, interaction.user.id)
    if channel is not None and channel.type in THREAD_TYPES:
        return Conversation.thread(interaction.guild_id, channel.parent_id, channel.id)
    return Conversation.mention(interaction.guild_id, channel_id, interaction.user.id)


def scope_channel_id(interaction: discord.Interaction[Any]) -> int | None:
    """The channel knowledge is scoped to (a thread's parent)."""
    channel: Any = interaction.channel
    if channel is not None and channel.type in THREAD_TYPES:
        return int(channel.parent_id) if channel.parent_id else None
    return interaction.channel_id


def format_hits(
    query: str,
    hits: list[RankedHit],
    limit: int = DISCORD_LIMIT,
    links: Mapping[int, MessageLink] | None = None,
) -> str:
    """Search results as one Discord message (snippets shortened to fit).

    A hit from a conversation links back to its first message on Discord.
    """
    if not hits:
        return texts.SEARCH_EMPTY.format(query=query)
    lines = [f"**「{query}」の検索結果**"]
    for i, ranked in enumerate(hits, 1):
        hit = ranked.hit
        snippet = " ".join(hit.content.split())
        if len(snippet) > SNIPPET_CHARS:
            snippet = snippet[: SNIPPET_CHARS - 1] + "…"
        link = (links or {}).get(hit.chunk_id)
        where = f" [{texts.SEARCH_LINK}](<{link.url}>)" if link else ""
        entry = f"{i}. **{describe_source(hit)}** ({ranked.score:.3f}){where}\n> {snippet}"
        if sum(len(x) + 1 for x in lines) + len(entry) > limit - 10:
            lines.append("…")
            break
        lines.append(entry)
    return "\n".join(lines)


class ConversationCog(commands.Cog):
    """Messages and guild membership events."""

    def __init__(self, handler: MessageHandler, chat: ChatService) -> None:
        self.handler = handler
        self.chat = chat

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Every message the bot can see goes through the handler."""
        await self.handler.handle(message)

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        """The bot left or was removed: its data stays (see DATA_RETENTION_DAYS)."""
        self.chat.retention.note_left(guild.id)
        if self.chat.retention.enabled:
            log.info(
                "removed from guild %d; its data is deleted after %d days unless the bot returns",
                guild.id,
                self.chat.retention.days,
            )
        else:
            log.info("removed from guild %d; its data stays (DATA_RETENTION_DAYS=0)", guild.id)

    @commands.Cog.listener()
    async def on_guild_join(self, guild: discord.Guild) -> None:
        """Back in a guild: stop its retention clock."""
        self.chat.retention.note_joined(guild.id)


class ChatCog(commands.GroupCog, group_name="chat", group_description="ことはとの会話"):
    """``/chat reset`` and ``/chat status``."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        super().__init__()

    @app_commands.command(name="reset")
    async def reset(self, interaction: discord.Interaction[Any]) -> None:
        """Start a fresh conversation here (earlier messages stay as knowledge)."""
        conv = conversation_for(interaction)
        done = await self.chat.reset(conv)
        await interaction.response.send_message(
            texts.RESET_DONE if done else texts.RESET_NOTHING,
            ephemeral=conv.session_type != "thread",
        )

    @app_commands.command(name="status")
    async def status(self, interaction: discord.Interaction[Any]) -> None:
        """Show this conversation: its size, last activity and knowledge used last turn."""
        conv = conversation_for(interaction)
        summary = await self.chat.summary(conv)
        if summary is None:
            await interaction.response.send_message(texts.STATUS_NONE, ephemeral=True)
            return
        hits = summary.knowledge_hits_last_turn
        lines = [
            f"**会話** `{summary.session_key}`",
            f"- メッセージ: {summary.messages}件（リセット後 {summary.messages_since_reset}件）",
            f"- 最後のやりとり: <t:{int(summary.last_active_at.timestamp())}:R>",
            "- 前回の返事で使った知識: "
            + (f"{hits}件" if hits is not None else "不明（再起動後まだ話していません）"),
        ]
        if conv.guild_id is not None:
            channel = scope_channel_id(interaction)
            on = channel is not None and self.chat.eavesdrop_enabled(channel)
            lines.append(f"- このチャンネルの eavesdrop: {'オン' if on else 'オフ'}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)


class KnowledgeCog(commands.GroupCog, group_name="kb", group_description="ことはの知識ベース"):
    """``/kb search``, ``/kb forget`` and ``/kb add``."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        super().__init__()

    @app_commands.command(name="search")
    @app_commands.describe(query="探したいこと（日本語でも英語でも）", top_k="表示する件数 (1-10)")
    async def search(
        self,
        interaction: discord.Interaction[Any],
        query: str,
        top_k: app_commands.Range[int, 1, 10] | None = None,
    ) -> None:
        """Search this server's knowledge base (only you see the results)."""
        if interaction.guild_id is None:
            await interaction.response.send_message(texts.SEARCH_DM, ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            hits = await self.chat.search(
                interaction.guild_id, scope_channel_id(interaction), query, top_k
            )
        except KotonohaError as exc:
            log.error("/kb search failed: %s", exc)
            await interaction.followup.send(texts.INTERNAL_ERROR, ephemeral=True)
            return
        links = await self.chat.links(hits)
        await interaction.followup.send(format_hits(query, hits, links=links), ephemeral=True)

    @app_commands.command(name="add")
    @app_commands.describe(file="知識に加える .txt・.md・.pdf ファイル（サーバー管理者のみ）")
    async def add(self, interaction: discord.Interaction[Any], file: discord.Attachment) -> None:
        """Add a text, Markdown or PDF file to this server's knowledge (Manage Server)."""
        await add_attachment(self.chat, interaction, file)

    @app_commands.command(name="forget")
    @app_commands.describe(
        scope="me: 自分のメッセージ / channel: このチャンネル全体"
        " / guild: サーバー全体（channel・guild は管理者のみ）",
        confirm="channel・guild の削除を確定するには True",
    )
    async def forget(
        self,
        interaction: discord.Interaction[Any],
        scope: Literal["me", "channel", "guild"] = "me",
        confirm: bool = False,
    ) -> None:
        """Delete your messages and the knowledge made from them (admins: a channel or server)."""
        if interaction.guild_id is None:
            deleted = await self.chat.forget_dm(interaction.channel_id or 0, interaction.user.id)
            await interaction.response.send_message(
                texts.FORGET_DM_DONE if deleted else texts.FORGET_DM_NOTHING, ephemeral=True
            )
            return
        guild_id = interaction.guild_id
        what = "このチャンネル" if scope == "channel" else "このサーバー"
        if scope != "me":
            if not interaction.permissions.manage_guild:
                await interaction.response.send_message(texts.FORGET_NEEDS_ADMIN, ephemeral=True)
                return
            if not confirm:
                await interaction.response.send_message(
                    texts.FORGET_NEEDS_CONFIRM.format(what=what), ephemeral=True
                )
                return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            if scope == "me":
                result = await self.chat.forget(guild_id, user_id=interaction.user.id)
                text = texts.FORGET_DONE_ME.format(messages=result.messages, chunks=result.chunks)
                if result.memories:
                    text += texts.FORGET_DONE_ME_MEMORIES.format(memories=result.memories)
            else:
                channel_id = scope_channel_id(interaction) if scope == "channel" else None
                result = await self.chat.forget(guild_id, channel_id=channel_id)
                text = texts.FORGET_DONE_SCOPE.format(
                    what=what,
                    sessions=result.sessions,
                    messages=result.messages,
                    chunks=result.chunks,
                    sources=result.sources,
                )
        except KotonohaError as exc:
            log.error("/kb forget failed: %s", exc)
            text = texts.INTERNAL_ERROR
        log.info("/kb forget scope=%s guild=%d by user %d", scope, guild_id, interaction.user.id)
        await interaction.followup.send(text, ephemeral=True)


@app_commands.guild_only()
@app_commands.default_permissions(manage_channels=True)
class AdminCog(
    commands.GroupCog, group_name="kotonoha", group_description="ことはの設定（管理者向け）"
):
    """``/kotonoha eavesdrop`` and ``/kotonoha usage``."""

    def __init__(self, chat: ChatService, settings: Settings, handler: MessageHandler) -> None:
        self.chat = chat
        self.settings = settings
        self.handler = handler
        super().__init__()

    @app_commands.command(name="eavesdrop")
    @app_commands.describe(mode="on: 会話を見守って、役に立てそうなときに加わる / off: やめる")
    async def eavesdrop(
        self, interaction: discord.Interaction[Any], mode: Literal["on", "off"]
    ) -> None:
        """Let kotonoha join this channel's conversations on its own (opt-in)."""
        channel: Any = interaction.channel
        if (
            interaction.guild_id is None
            or interaction.channel_id is None
            or (channel is not None and channel.type in THREAD_TYPES)
        ):
            await interaction.response.send_message(texts.EAVESDROP_GUILD_ONLY, ephemeral=True)
            return
        if not interaction.permissions.manage_channels:
            await interaction.response.send_message(
                texts.EAVESDROP_NEEDS_PERMISSION, ephemeral=True
            )
            return
        enabled = mode == "on"
        await self.chat.set_eavesdrop(interaction.guild_id, interaction.channel_id, enabled)
        if enabled:
            text = texts.EAVESDROP_ON.format(cooldown=int(self.settings.eavesdrop_cooldown_seconds))
            if not self.settings.discord_message_content:
                text += texts.EAVESDROP_ON_NO_CONTENT
        else:
            self.handler.eavesdrop.forget(interaction.channel_id)
            text = texts.EAVESDROP_OFF
        log.info(
            "eavesdrop %s in channel %d by user %d",
            mode,
            interaction.channel_id,
            interaction.user.id,
        )
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="usage")
    async def usage(self, interaction: discord.Interaction[Any]) -> None:
        """Show this server's LLM usage today and this month (Manage Server)."""
        if interaction.guild_id is None:
            await interaction.response.send_message(texts.EAVESDROP_GUILD_ONLY, ephemeral=True)
            return
        if not interaction.permissions.manage_guild:
            await interaction.response.send_message(texts.USAGE_NEEDS_ADMIN, ephemeral=True)
            return
        try:
            summary = await self.chat.usage.summary(interaction.guild_id)
        except KotonohaError as exc:
            log.error("/kotonoha usage failed: %s", exc)
            await interaction.response.send_message(texts.INTERNAL_ERROR, ephemeral=True)
            return
        await interaction.response.send_message(
            format_usage(summary, self.settings), ephemeral=True
        )


def format_usage(summary: UsageSummary, settings: Settings) -> str:
    """``/kotonoha usage`` as one Discord message."""

    def line(label: str, t: Totals) -> str:
        return texts.USAGE_LINE.format(
            label=label,
            calls=t.calls,
            input=t.input_tokens,
            output=t.output_tokens,
            total=t.tokens,
        )

    def cap(value: int) -> str:
        return f"{value:,}" if value else texts.USAGE_UNLIMITED

    lines = [
        texts.USAGE_HEAD,
        line(f"今日 {summary.today.isoformat()}", summary.day),
        line(f"今月 {summary.today.strftime('%Y-%m')}", summary.month),
    ]
    for model, totals in sorted(summary.month_by_model.items()):
        lines.append(texts.USAGE_MODEL.format(model=model, total=totals.tokens))
    for user, totals in summary.month_by_user:
        lines.append(texts.USAGE_USER.format(user=user, total=totals.tokens))
    lines.append(
        texts.USAGE_BUDGET.format(
            guild=cap(settings.guild_daily_token_budget), user=cap(settings.user_daily_token_budget)
        )
    )
    return "\n".join(lines)[:DISCORD_LIMIT]
