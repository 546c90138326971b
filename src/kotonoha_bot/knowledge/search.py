"""Hybrid search: reciprocal rank fusion of vector and keyword results.

Vector search finds paraphrases; keyword search (character bigrams for Japanese,
words for English) finds short Japanese words, names and codes an embedding blurs.
RRF combines ranks, not scores, so the two scales never need calibrating:
``score = w_vec / (k + rank_vec) + w_kw / (k + rank_kw)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kotonoha_bot.db.base import DatabaseProtocol
from kotonoha_bot.errors import EmbeddingError
from kotonoha_bot.knowledge.chunking import normalize_for_query
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.models import SearchHit

log = logging.getLogger("kotonoha_bot.knowledge")

SearchMode = Literal["hybrid", "vector", "keyword"]
SEARCH_MODES: tuple[str, ...] = ("hybrid", "vector", "keyword")
#: Weight of a source-level vote relative to the chunk's own rank.
SOURCE_VOTE = 1.0


@dataclass(frozen=True, slots=True)
class RankedHit:
    """A search result with how each mode ranked it (1-based; None = not found by it)."""

    hit: SearchHit
    score: float
    vector_rank: int | None = None
    keyword_rank: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (used by ``kb search --json``)."""
        h = self.hit
        return {
            "score": round(self.score, 6),
            "chunk_id": h.chunk_id,
            "source_id": h.source_id,
            "source_title": h.source_title,
            "source_uri": h.source_uri,
            "chunk_index": h.chunk_index,
            "location": h.metadata.get("heading", ""),
            "similarity": None if h.similarity is None else round(h.similarity, 6),
            "vector_rank": self.vector_rank,
            "keyword_rank": self.keyword_rank,
            "guild_id": h.guild_id,
            "channel_id": h.channel_id,
            "content": h.content,
            "metadata": h.metadata,
        }


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The ranked hits and what happened on the way (e.g. a failed query embedding)."""

    hits: list[RankedHit]
    mode: str
    warnings: list[str] = field(default_factory=list)


def reciprocal_rank_fusion(
    vector_hits: list[SearchHit],
    keyword_hits: list[SearchHit],
    *,
    k: int,
    vector_weight: float,
    keyword_weight: float,
    top_k: int,
) -> list[RankedHit]:
    """Fuse two ranked lists; ties broken by chunk id for a stable order."""
    modes = (
        (vector_weight, vector_hits, "vector_rank"),
        (keyword_weight, keyword_hits, "keyword_rank"),
    )
    fused: dict[int, dict[str, Any]] = {}
    for weight, hits, key in modes:
        for rank, hit in enumerate(hits, start=1):
            entry = fused.setdefault(hit.chunk_id, {"hit": hit, "score": 0.0})
            entry["score"] += weight / (k + rank)
            entry[key] = rank
            if key == "vector_rank":
                entry["hit"] = hit  # keep the vector hit: it carries the similarity
    # Each chunk also earns each mode's rank of its *source*: when the two modes pick
    # different passages of one document, the document still gets both votes.
    for weight, hits, _key in modes:
        source_rank: dict[int, int] = {}
        for hit in hits:
            source_rank.setdefault(hit.source_id, len(source_rank) + 1)
        for entry in fused.values():
            src = source_rank.get(entry["hit"].source_id)
            if src is not None:
                entry["score"] += SOURCE_VOTE * weight / (k + src)
    ranked = sorted(fused.values(), key=lambda e: (-e["score"], e["hit"].chunk_id))
    return [
        RankedHit(
            hit=e["hit"],
            score=e["score"],
            vector_rank=e.get("vector_rank"),
            keyword_rank=e.get("keyword_rank"),
        )
        for e in ranked[:top_k]
    ]


async def search_knowledge(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    query: str,
    *,
    guild_id: int,
    channel_id: int | None = None,
    mode: str = "hybrid",
    top_k: int = 5,
    filters: Mapping[str, Any] | None = None,
    rrf_k: int = 20,
    vector_weight: float = 1.0,
    keyword_weight: float = 1.0,
    min_similarity: float | None = None,
) -> SearchResult:
    """Search one guild's knowledge (optionally one channel) in the given mode."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
    text = normalize_for_query(query)
    warnings: list[str] = []
    # Fusion looks deeper than top_k so a chunk ranked 12th by one mode and 2nd by
    # the other still competes.
    depth = top_k if mode != "hybrid" else max(top_k * 4, 20)
    vector_hits: list[SearchHit] = []
    keyword_hits: list[SearchHit] = []
    if mode in ("hybrid", "vector") and text:
        if embedder is None:
            warnings.append("no embedding provider: vector search skipped")
        else:
            try:
                qvec = (await embedder.embed_queries([text]))[0]
            except EmbeddingError as exc:
                if mode == "vector":
                    raise
                warnings.append(f"query embedding failed, keyword results only: {exc}")
                log.warning("query embedding failed; falling back to keyword search: %s", exc)
            else:
                vector_hits = await db.similarity_search(
                    qvec,
                    guild_id=guild_id,
                    channel_id=channel_id,
                    top_k=depth,
                    filters=filters,
                    min_similarity=min_similarity,
                )
    if mode in ("hybrid", "keyword") and text:
        keyword_hits = await db.keyword_search(
            text, guild_id=guild_id, channel_id=channel_id, top_k=depth, filters=filters
        )
    if mode == "vector":
        hits = [
            RankedHit(hit=h, score=h.score, vector_rank=i)
            for i, h in enumerate(vector_hits[:top_k], 1)
        ]
    elif mode == "keyword":
        hits = [
            RankedHit(hit=h, score=h.score, keyword_rank=i)
            for i, h in enumerate(keyword_hits[:top_k], 1)
        ]
    else:
        hits = reciprocal_rank_fusion(
            vector_hits,
            keyword_hits,
            k=rrf_k,
            vector_weight=vector_weight,
            keyword_weight=keyword_weight,
            top_k=top_k,
        )
    return SearchResult(hits=hits, mode=mode, warnings=warnings)
