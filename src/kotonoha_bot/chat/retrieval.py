"""Knowledge for a turn: this channel first, then the rest of the guild; nothing in a DM.

Part of :class:`~kotonoha_bot.chat.service.ChatService` (mixed in). Every hit is
re-checked against the asked guild (defence in depth: the database already scopes by
guild), and snippets of this very session that are still in the history sent are
skipped. The operator's search overrides come from one
:meth:`~kotonoha_bot.knowledge.search.SearchTuning.from_settings`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kotonoha_bot.chat.conversation import Conversation
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.knowledge.search import RankedHit, SearchTuning, search_knowledge
from kotonoha_bot.models import MessageLink

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.db.contract import DatabaseProtocol
    from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider

log = logging.getLogger("kotonoha_bot.chat")


class KnowledgeRetrieval:
    """Retrieval for the chat pipeline (uses the service's database, embedder, settings)."""

    if TYPE_CHECKING:
        db: DatabaseProtocol
        embedder: EmbeddingProvider | None
        settings: Settings

    async def links(self, hits: Sequence[RankedHit]) -> dict[int, MessageLink]:
        """Jump links of conversation hits (the first Discord message of each chunk)."""
        ids = [h.hit.chunk_id for h in hits]
        if not ids:
            return {}
        try:
            origins = await self.db.chunk_origins(ids)
        except KotonohaError as exc:
            log.warning("could not read chunk provenance: %s", exc)
            return {}
        return {cid: o.first_link for cid, o in origins.items() if o.first_link is not None}

    async def retrieve(
        self, conv: Conversation, query: str, *, history_from: int | None = None
    ) -> list[RankedHit]:
        """Knowledge for ``query``: this channel first, filled from the same guild.

        A DM has no guild and retrieves nothing. Snippets archived from this very
        session that are still in the history sent (``history_from`` on) are skipped.
        A failing search is logged and the turn goes on without knowledge.
        """
        if conv.guild_id is None or not query.strip():
            return []
        top_k = self.settings.search_top_k
        try:
            # One extra per channel/guild pass for a snippet dropped as already in history.
            hits = await self.search(conv.guild_id, conv.channel_id, query, top_k + 2)
        except KotonohaError as exc:
            log.warning("knowledge search failed, answering without it: %s", exc)
            return []
        kept = [h for h in hits if not in_history(h, conv.session_key, history_from)]
        return kept[:top_k]

    async def search(
        self, guild_id: int, channel_id: int | None, query: str, top_k: int | None = None
    ) -> list[RankedHit]:
        """Hybrid search of one guild: the channel's own knowledge first, then the rest."""
        top_k = top_k or self.settings.search_top_k
        hits = await self._search(guild_id, channel_id, query, top_k) if channel_id else []
        if len(hits) < top_k:
            seen = {h.hit.chunk_id for h in hits}
            more = await self._search(guild_id, None, query, top_k + len(seen))
            hits += [h for h in more if h.hit.chunk_id not in seen]
        # Defence in depth: the database scopes by guild; never pass on anything else.
        return [h for h in hits if h.hit.guild_id == guild_id][:top_k]

    async def _search(
        self, guild_id: int, channel_id: int | None, query: str, top_k: int
    ) -> list[RankedHit]:
        s = self.settings
        result = await search_knowledge(
            self.db,
            self.embedder,
            query,
            guild_id=guild_id,
            channel_id=channel_id,
            mode="hybrid",
            top_k=top_k,
            tuning=SearchTuning.from_settings(s),
        )
        return list(result.hits)


def in_history(hit: RankedHit, session_key: str, history_from: int | None) -> bool:
    """True for a snippet of this session that the history sent still holds."""
    meta = hit.hit.metadata
    if history_from is None or meta.get("session_key") != session_key:
        return False
    first = meta.get("first_index")
    return isinstance(first, int) and first >= history_from
