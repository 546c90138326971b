"""Explicit memories: what a user asked the bot to remember (``/memory add``).

Nothing here is mined from conversations: a memory exists only because its owner
wrote it. A memory belongs to one user in one scope — a guild, or the user's DMs
(``guild_id`` None) — and is put into the prompt of that user's own turns in that
scope and nowhere else: not into another user's turns, not into another guild, not
into a multi-speaker eavesdrop turn. The newest memories that fit
``MEMORY_PROMPT_TOKEN_BUDGET`` are used.

Deleting: the owner deletes their own; a member with Manage Server may delete any
memory of their guild (never DM memories, which no admin can see).
"""

from __future__ import annotations

import logging

from kotonoha_bot.chat.prompt import MESSAGE_OVERHEAD_TOKENS, estimate_tokens
from kotonoha_bot.config import Settings
from kotonoha_bot.db.checks import check_memory
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.models import Memory
from kotonoha_bot.text import normalize_text, replace_nul

log = logging.getLogger("kotonoha_bot.chat")


class MemoryBook:
    """Add, list, delete and select the memories of one user in one scope."""

    def __init__(self, db: DatabaseProtocol, settings: Settings) -> None:
        self._db = db
        self._settings = settings

    async def add(self, guild_id: int | None, user_id: int, text: str) -> Memory:
        """Store a memory (NUL replaced, whitespace normalised); typed errors on bad input."""
        clean = normalize_text(replace_nul(text)[0]).strip()
        memory = Memory(user_id=user_id, content=clean, guild_id=guild_id)
        check_memory(memory, max_chars=self._settings.memory_max_chars)
        return await self._db.add_memory(memory, max_per_user=self._settings.memory_max_per_user)

    async def mine(self, guild_id: int | None, user_id: int) -> list[Memory]:
        """The user's own memories in this scope, newest first."""
        return await self._db.list_memories(
            guild_id=guild_id, user_id=user_id, limit=self._settings.memory_max_per_user
        )

    async def delete(
        self, memory_id: int, *, guild_id: int | None, user_id: int, admin: bool = False
    ) -> bool:
        """Delete one of the user's memories (an admin: any memory of the guild)."""
        owner = None if (admin and guild_id is not None) else user_id
        return await self._db.delete_memory(memory_id, guild_id=guild_id, user_id=owner)

    async def for_turn(self, guild_id: int | None, user_id: int | None) -> list[Memory]:
        """The memories to put into this user's turn (newest first, within the budget).

        A failing lookup is logged and the turn goes on without memories.
        """
        budget = self._settings.memory_prompt_token_budget
        if user_id is None or budget <= 0:
            return []
        try:
            memories = await self.mine(guild_id, user_id)
        except KotonohaError as exc:
            log.warning("could not read memories, answering without them: %s", exc)
            return []
        chosen: list[Memory] = []
        used = 0
        for memory in memories:
            cost = estimate_tokens(memory.content) + MESSAGE_OVERHEAD_TOKENS
            if used + cost > budget:
                break
            chosen.append(memory)
            used += cost
        return chosen
