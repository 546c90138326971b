"""`kotonoha chat`: the bot's pipeline in a terminal, one line per message."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from typing import Annotated

import typer
from rich.markup import escape

from kotonoha_bot.cli.common import (
    DatabaseOption,
    database_url,
    err_console,
    fail,
    get_settings,
    run_async,
)
from kotonoha_bot.errors import DatabaseError
from kotonoha_bot.redact import redact

QUIT_COMMANDS = ("/quit", "/exit")


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of stdin, read by a daemon thread (Ctrl-C never waits for a blocked read)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def reader() -> None:
        try:
            for line in sys.stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=reader, name="kotonoha-stdin", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


@run_async
async def chat(
    guild: Annotated[int, typer.Option("--guild", "-g", help="Guild (server) id.")] = 1,
    channel: Annotated[int, typer.Option("--channel", "-c", help="Channel id.")] = 1,
    user: Annotated[int, typer.Option("--user", "-u", help="Your user id.")] = 1,
    name: Annotated[str, typer.Option("--name", help="Your display name.")] = "you",
    dm: Annotated[
        bool, typer.Option("--dm", help="Talk as in a DM: no guild, no knowledge retrieval.")
    ] = False,
    database: DatabaseOption = None,
) -> None:
    """Talk to kotonoha in the terminal: the same pipeline as on Discord.

    Each line on stdin is one message and each reply is printed on stdout, so it
    works with piped input. The conversation is the session a mention of --user
    in --channel would use on Discord: it is stored after every turn and continues
    in the next run. `/reset` starts afresh, `/status` shows the session, `/quit`
    (or end of input) stops. Needs the LLM settings (ANTHROPIC_API_KEY, or
    LLM_PROVIDER=openai with OPENAI_API_KEY or LLM_BASE_URL).

    Example: echo "こんにちは" | kotonoha chat --guild 1 --channel 1 --user 1
    """
    from kotonoha_bot.chat import ChatService, Conversation, Incoming
    from kotonoha_bot.chat.service import checked_embedder
    from kotonoha_bot.db import open_database
    from kotonoha_bot.knowledge.embeddings import open_embedder
    from kotonoha_bot.llm import create_llm_provider, missing_llm_settings
    from kotonoha_bot.logging_setup import setup_logging

    settings = get_settings()
    missing = missing_llm_settings(settings)
    if missing:
        raise fail(
            f"missing settings for LLM_PROVIDER={settings.llm_provider}: {', '.join(missing)}"
            " (set them in the environment or .env)",
            2,
        )
    setup_logging(settings)
    conv = Conversation.dm(channel, user) if dm else Conversation.mention(guild, channel, user)
    interactive = sys.stdin.isatty()
    async with open_database(database_url(settings, database), settings=settings) as db:
        embedder = await open_embedder(db, settings)
        llm = create_llm_provider(settings)
        service = ChatService(db, llm, await checked_embedder(db, embedder), settings)
        try:
            if interactive:
                err_console.print(f"session {conv.session_key} — /quit to stop")
                err_console.print("[bold]you>[/] ", end="")
            async for line in stdin_lines():
                text = line.rstrip("\n")
                command = text.strip().lower()
                if command in QUIT_COMMANDS:
                    break
                if command == "/reset":
                    done = await service.reset(conv)
                    err_console.print("conversation reset" if done else "nothing to reset")
                elif command == "/status":
                    summary = await service.summary(conv)
                    err_console.print(
                        "no conversation yet"
                        if summary is None
                        else f"{summary.session_key}: {summary.messages} messages"
                        f" ({summary.messages_since_reset} since reset), last active"
                        f" {summary.last_active_at:%Y-%m-%d %H:%M:%S} UTC, knowledge hits"
                        f" last turn: {summary.knowledge_hits_last_turn}"
                    )
                elif command:
                    try:
                        reply = await service.respond(
                            conv, [Incoming(text=text, author_id=user, author_name=name)]
                        )
                    except DatabaseError as exc:
                        # One turn failed (the database is down or refused the write): say
                        # so and keep reading, so the lines after it are not dropped.
                        err_console.print(
                            f"[bold red]error:[/] {escape(redact(f'{type(exc).__name__}: {exc}'))}"
                            " — this message was not answered; it is kept and stored"
                            " with your next one, once the database is back",
                            soft_wrap=True,
                        )
                    else:
                        # Printed only after the reply is stored: what you see is on disk.
                        sys.stdout.write(reply.text + "\n")
                        sys.stdout.flush()
                if interactive:
                    err_console.print("[bold]you>[/] ", end="")
        finally:
            try:
                await service.close()
            finally:
                await llm.aclose()
                await embedder.aclose()
