"""``/kb add``: a Discord attachment becomes knowledge, through the ``kb ingest`` rules.

Only ``.txt``, ``.md``/``.markdown`` and ``.pdf`` are accepted, up to
``KB_ADD_MAX_BYTES`` (checked from the attachment's declared size before anything is
downloaded, and again on the bytes). The bytes go to
:meth:`~kotonoha_bot.chat.service.ChatService.add_document`, the same entry point
as files on disk (decoding, the NUL rule, dedup by content hash, pending chunks when
the embedder fails). The ephemeral response is edited as the work goes on — reading,
embedding ``n/m`` (at most every :data:`EDIT_INTERVAL_SECONDS`), then the outcome.
The document is scoped to the whole guild; adding a file with the same name again
replaces it.
"""

from __future__ import annotations

import logging
import time
from pathlib import PurePosixPath
from typing import Any

import discord

from kotonoha_bot.bot import texts
from kotonoha_bot.chat.service import ChatService
from kotonoha_bot.errors import InvalidInputError, KotonohaError
from kotonoha_bot.text import human_size

log = logging.getLogger("kotonoha_bot.bot")

ACCEPTED_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".pdf"})
#: Progress edits at most this often (Discord rate-limits message edits).
EDIT_INTERVAL_SECONDS = 2.0
#: Longest file name kept in the document's name.
MAX_NAME_CHARS = 100


def attachment_uri(filename: str) -> str:
    """The document's name in the guild's knowledge: ``discord:<file name>``."""
    name = PurePosixPath(filename.replace("\\", "/")).name[:MAX_NAME_CHARS] or "attachment"
    return f"discord:{name}"


async def add_attachment(
    chat: ChatService, interaction: discord.Interaction[Any], attachment: discord.Attachment
) -> None:
    """Check, download, ingest and report (the interaction is answered here)."""
    limit = chat.settings.kb_add_max_bytes
    name = attachment.filename
    if interaction.guild_id is None:
        await interaction.response.send_message(texts.KB_ADD_GUILD_ONLY, ephemeral=True)
        return
    if not interaction.permissions.manage_guild:
        await interaction.response.send_message(texts.KB_ADD_NEEDS_ADMIN, ephemeral=True)
        return
    if PurePosixPath(name).suffix.lower() not in ACCEPTED_SUFFIXES:
        await interaction.response.send_message(texts.KB_ADD_TYPE.format(name=name), ephemeral=True)
        return
    if attachment.size > limit:
        await interaction.response.send_message(
            texts.KB_ADD_TOO_LARGE.format(
                name=name, size=human_size(attachment.size), limit=human_size(limit)
            ),
            ephemeral=True,
        )
        return
    guild_id = interaction.guild_id
    await interaction.response.defer(ephemeral=True, thinking=True)
    await _edit(interaction, texts.KB_ADD_READING.format(name=name))
    try:
        data = await attachment.read()
    except discord.HTTPException as exc:
        log.warning("/kb add: could not download %s: HTTP %s", name, exc.status)
        await _edit(interaction, texts.KB_ADD_FAILED.format(name=name, reason=f"HTTP {exc.status}"))
        return
    if len(data) > limit:
        await _edit(
            interaction,
            texts.KB_ADD_TOO_LARGE.format(
                name=name, size=human_size(len(data)), limit=human_size(limit)
            ),
        )
        return
    last_edit = time.monotonic()

    async def progress(done: int, total: int) -> None:
        nonlocal last_edit
        now = time.monotonic()
        if done < total and now - last_edit < EDIT_INTERVAL_SECONDS:
            return
        last_edit = now
        await _edit(interaction, texts.KB_ADD_EMBEDDING.format(name=name, done=done, total=total))

    uri = attachment_uri(name)
    try:
        outcome, report = await chat.add_document(
            guild_id,
            uri,
            data,
            metadata={"added_by": interaction.user.id, "filename": name},
            on_batch=progress,
        )
    except InvalidInputError as exc:
        await _edit(interaction, texts.KB_ADD_FAILED.format(name=name, reason=str(exc)))
        return
    except KotonohaError as exc:
        log.error("/kb add %s failed: %s", name, exc)
        await _edit(interaction, texts.INTERNAL_ERROR)
        return
    log.info(
        "/kb add %s into guild %d by user %d: %s (%d chunks)",
        uri,
        guild_id,
        interaction.user.id,
        outcome,
        report.chunks,
    )
    template = {
        "added": texts.KB_ADD_DONE,
        "updated": texts.KB_ADD_UPDATED,
        "unchanged": texts.KB_ADD_UNCHANGED,
        "pending": texts.KB_ADD_PENDING,
    }[outcome]
    text = template.format(name=name, chunks=report.chunks)
    if report.invalid_utf8_files:
        text += texts.KB_ADD_INVALID_UTF8
    await _edit(interaction, text)


async def _edit(interaction: discord.Interaction[Any], content: str) -> None:
    try:
        await interaction.edit_original_response(content=content)
    except discord.HTTPException as exc:
        log.warning("/kb add: could not update the response: HTTP %s", exc.status)
