"""The search playground: one query, the three modes side by side, and the floor's verdict.

Each mode runs through :func:`kotonoha_bot.knowledge.search.search_knowledge`, the
function the bot itself searches with, so what the page shows is what the bot would
get. Hybrid is run with the floor off so its hits can be seen even when the floor
would drop them; the verdict is :func:`~kotonoha_bot.knowledge.search.nothing_relevant`
over the vector and keyword lists, as in a real turn. Overrides of the vector share
and the two floors are the ``HYBRID_VECTOR_SHARE`` / ``SEARCH_MIN_SIMILARITY`` /
``SEARCH_MIN_COVERAGE`` settings, so a tuning found here can be copied into ``.env``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.knowledge.search import (
    FusionProfile,
    RankedHit,
    fusion_profile,
    nothing_relevant,
    search_knowledge,
)


@dataclass(frozen=True, slots=True)
class Tuning:
    """The operator's overrides (None: the embedder's measured profile)."""

    vector_share: float | None = None
    min_similarity: float | None = None
    min_coverage: float | None = None


@dataclass(frozen=True, slots=True)
class Comparison:
    """What the page shows for one query."""

    vector: list[RankedHit]
    keyword: list[RankedHit]
    hybrid: list[RankedHit]
    profile: FusionProfile
    dropped: bool
    best_similarity: float | None
    best_coverage: float | None
    warnings: list[str] = field(default_factory=list)

    def below_floor(self, hit: RankedHit) -> bool:
        """Whether this hit alone would fail both floors (a side without one never fails)."""
        p = self.profile
        sim_ok = p.min_similarity is None or (
            hit.hit.similarity is not None and hit.hit.similarity >= p.min_similarity
        )
        cov_ok = p.min_coverage is None or (
            hit.hit.coverage is not None and hit.hit.coverage >= p.min_coverage
        )
        return not (sim_ok or cov_ok)


def effective_profile(embedder: EmbeddingProvider | None, tuning: Tuning) -> FusionProfile:
    """The profile hybrid search uses with these overrides."""
    profile = fusion_profile(embedder.model if embedder is not None else None)
    if tuning.vector_share is not None:
        profile = replace(profile, vector_share=tuning.vector_share)
    if tuning.min_similarity is not None:
        profile = replace(profile, min_similarity=tuning.min_similarity)
    if tuning.min_coverage is not None:
        profile = replace(profile, min_coverage=tuning.min_coverage)
    return profile


async def compare_modes(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    query: str,
    *,
    guild_id: int,
    channel_id: int | None,
    top_k: int,
    tuning: Tuning,
) -> Comparison:
    """Run the query in the three modes within one guild (and channel)."""
    profile = effective_profile(embedder, tuning)
    depth = max(top_k, profile.depth)
    warnings: list[str] = []
    vector = await search_knowledge(
        db, embedder, query, mode="vector", top_k=depth, guild_id=guild_id, channel_id=channel_id
    )
    keyword = await search_knowledge(
        db, embedder, query, mode="keyword", top_k=depth, guild_id=guild_id, channel_id=channel_id
    )
    hybrid = await search_knowledge(
        db,
        embedder,
        query,
        guild_id=guild_id,
        channel_id=channel_id,
        mode="hybrid",
        top_k=top_k,
        floor=False,
        vector_share=tuning.vector_share,
        min_similarity=tuning.min_similarity,
        min_coverage=tuning.min_coverage,
    )
    for result in (vector, keyword, hybrid):
        warnings += [w for w in result.warnings if w not in warnings]
    vector_hits = [h.hit for h in vector.hits[: profile.depth]]
    keyword_hits = [h.hit for h in keyword.hits[: profile.depth]]
    dropped = bool(hybrid.hits) and nothing_relevant(vector_hits, keyword_hits, profile)
    return Comparison(
        vector=vector.hits[:top_k],
        keyword=keyword.hits[:top_k],
        hybrid=hybrid.hits,
        profile=profile,
        dropped=dropped,
        best_similarity=max(
            (h.similarity for h in vector_hits if h.similarity is not None), default=None
        ),
        best_coverage=max(
            (h.coverage for h in keyword_hits if h.coverage is not None), default=None
        ),
        warnings=warnings,
    )
