"""Hybrid search: score fusion of vector and keyword results, and a relevance floor.

Vector search finds paraphrases and other languages; keyword search (character
bigrams for Japanese, words for English) finds codes, names and rare words an
embedding blurs. Fusion must never make the answer worse than the better half, so
it looks at *how sure* each half is instead of ranks alone (rank fusion let a
keyword list of chunks sharing only "how"/"to"/"the" outvote the right vector hit):

``score = a * ((sim - sim_low) / (sim_top - sim_low) + l * language_gap)``
``        + (1 - a) * t * (b * coverage**p + (1 - b) * bm25 / bm25_top)``

(keyword hits whose coverage reaches ``keyword_lead`` first, in keyword order)
over the first ``depth`` hits of each list: the vector side normalised between its
best and its ``depth``-th similarity, the keyword side by *coverage*, the
IDF-weighted share of the query's informative terms a chunk holds
(:func:`kotonoha_bot.text.keyword_plan`). ``coverage**p`` with a large ``p`` means a
chunk that holds every rare term of the query ("LT-1042") wins, and one that
shares a common word does not; ``t`` fades the whole keyword side when even its
best hit holds little of the query (a question asked in the other language).
``language_gap`` is how far a vector hit's language is from the query's (the
difference of their shares of Japanese letters, 0..1): semantic models put a
"which language" direction into every vector and so rank same-language chunks too
high; ``l`` gives the other language that distance back (measured on the held-out
half: raw e5 over the OpenAI API, cross-lingual recall@5 0.19 as vector search, 0.47
as hybrid with ``l`` = 0.6). ``keyword_lead`` (off unless a profile sets it) puts
keyword hits covering the whole query first, in keyword order.
**Exact-match lead.** Scores can still demote the keyword half's one confident
answer: a code or name ("#C8374B", "LT-1163") found whole in one to three
documents, which the vector side ranks second because another chunk is more similar
overall.
So when the keyword hits holding every informative term of the query come from at
most ``exact_lead_sources`` sources (3 in every shipped profile), the first of them
is ranked first whatever the fused scores say, and the rest follow in fused order. It
is a structural rule, not a weight: it fires only on a whole match in few sources
(on the round-2 set of 310 labelled queries: 58 of the 62 keyword-class ones, 3 about earlier
conversations, 1 paraphrase, 1 no-answer, no cross-lingual one).
**Leading half.** A profile may name one half that leads (``leading_half``): its
hits keep that half's own order, ahead of every hit only the other half found, which
fill the places behind in fused order (ties of the leading half's score are broken
by the fused score). Hybrid is then never below the leading half, by construction.
It is in the tuner's grid like the weights; on dev it won only for ``hashing``, whose
vector half is weaker than keyword search in every class (led by keyword search).
``a``, ``b``, ``p``, ``l``, ``depth``, the gate of ``t`` and the leading half form a
:class:`FusionProfile`, tuned per embedder on the dev half of the labelled set
(``python -m benchmarks.tune_fusion``: the profile whose worst class is furthest
above the better of its two halves); unknown semantic models get raw e5's weights.

Every hit keeps what the playground and ``kb search --json`` show: its vector and
keyword rank, similarity, coverage, and the two parts of its fused score.

**Relevance floor.** A hybrid query is answered only when one half vouches for it:
its best cosine similarity reaches the profile's ``min_similarity`` or its best
keyword coverage reaches ``min_coverage`` (:func:`floor_check`). Otherwise the
result is empty and the bot sends no reference at all, rather than the least-bad
chunks; the hits it would have shown are kept on the result (``dropped``) with the
numbers the floor compared. ``SEARCH_MIN_SIMILARITY`` / ``SEARCH_MIN_COVERAGE``
override the profile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import EmbeddingError
from kotonoha_bot.knowledge.chunking import normalize_for_query
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.models import SearchHit
from kotonoha_bot.text import japanese_share

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

log = logging.getLogger("kotonoha_bot.knowledge")

SearchMode = Literal["hybrid", "vector", "keyword"]
LeadingHalf = Literal["vector", "keyword"]
SEARCH_MODES: tuple[str, ...] = ("hybrid", "vector", "keyword")


@dataclass(frozen=True, slots=True)
class FusionProfile:
    """How hybrid search weighs and floors the two halves for one embedder."""

    vector_share: float
    """``a``: weight of the vector side (0..1)."""
    coverage_power: float
    """``p``: how strongly a full keyword match beats a partial one."""
    coverage_share: float
    """``b``: coverage vs BM25 within the keyword side."""
    depth: int
    """Hits of each list that take part."""
    min_similarity: float | None
    """Relevance floor on cosine similarity (None = no floor on this side)."""
    min_coverage: float | None
    """Relevance floor on keyword coverage (None = no floor on this side)."""
    coverage_gate: float = 0.0
    """Keyword side fades when the query's best coverage is below this (0 = never):
    a keyword list whose best hit holds little of the query (asked in the other
    language, or in other words) is noise next to the vector list."""
    language_bonus: float = 0.0
    """``l``: added to a vector hit's normalised similarity per unit of language gap
    between the query and the chunk (0 = off): undoes a semantic model's preference
    for chunks in the query's own language."""
    keyword_lead: float = 0.0
    """Keyword hits whose coverage reaches this go first, in keyword order (0 = off): a
    chunk holding every informative term of the query (a code, a file name, a
    channel) is the answer more surely than any similarity says."""
    exact_lead_sources: int = 0
    """The exact-match lead (0 = off): when the keyword hits that hold *every*
    informative term of the query come from at most this many sources, the first of
    them in keyword order is ranked first, whatever the scores say. A code, a file
    name or a channel found whole in one or two documents is the keyword half's
    confident answer, and fusion may not demote it below rank 1; found in many
    documents, the match no longer singles one out and the scores decide."""
    leading_half: LeadingHalf | None = None
    """The leading half (None = off): hybrid keeps that half's own order for the hits it
    returns (its first ``depth``), and the other half's hits only follow behind them, in
    fused order; where the leading half scores two hits the same (within a relative
    1e-9, so both backends' arithmetic see the same ties), the fused score breaks the
    tie. So hybrid is never below the leading half in recall@k or MRR, except among
    hits the leading half scores equally (the half itself orders those by chunk id,
    which says nothing) and where the exact-match or keyword lead, which come first,
    moves a hit ahead; the other half adds what the leading one did not find. For an embedder whose
    vector half is weaker than keyword search in every class (``hashing``), no weighting
    of the two gets above both halves; leading with the keyword half does, by
    construction, on the sources it finds."""

    def __post_init__(self) -> None:
        # Profiles are code, not user input: a misspelt half must not pass as "keyword".
        if self.leading_half not in (None, "vector", "keyword"):
            raise ValueError(
                f"leading_half must be 'vector', 'keyword' or None, not {self.leading_half!r}"
            )


#: The exact-match lead of every shipped profile: a whole match in at most three sources
#: leads. Chosen on the dev half as the largest value that lowers no dev margin (1, 2
#: and 3 score the same there; 5 puts a wrong file first for "LT-1042", a bug named in
#: five documents).
EXACT_LEAD_SOURCES = 3
#: Coverage that counts as "every informative term" (coverage is a float share).
FULL_COVERAGE = 0.999

#: Tuned on the dev half of examples/queries.json (451 of its 902 queries; rounds 4-5 of
#: issue 11) by ``python -m benchmarks.tune_fusion --sample 600 --refine 3``
#: (docs/KNOWLEDGE.md has the held-out results). Floors: the (similarity, coverage)
#: pair that turns away the most no-answer queries while answerable ones keep at least
#: 95 % of their recall.
FUSION_PROFILES: dict[str, FusionProfile] = {
    # Round 5: led by the keyword half (weights and floor as round 4's; the floor
    # re-picked on dev after the change is the same pair). No weighting of the grid
    # kept hybrid >= both halves on dev (worst margin -0.004); leading with keyword
    # search, which is >= the vector half in every class, does (worst margin +0.000).
    "hashing-ngram-v1": FusionProfile(
        0.1,
        1.0,
        0.9,
        20,
        0.174,
        0.6,
        0.0,
        0.2,
        exact_lead_sources=EXACT_LEAD_SOURCES,
        leading_half="keyword",
    ),
    "multilingual-e5-small-q4-lc": FusionProfile(
        0.4, 2.0, 1.0, 20, 0.3, 0.6, 0.0, 0.2, exact_lead_sources=EXACT_LEAD_SOURCES
    ),
    "multilingual-e5-small-q4": FusionProfile(
        0.3, 6.0, 0.7, 20, 0.806, 0.8, 0.0, 0.4, exact_lead_sources=EXACT_LEAD_SOURCES
    ),
}
#: Semantic models not measured here (OpenAI, other servers): the weights of raw e5
#: served over the OpenAI API (an uncentred semantic model, like most), no floor
#: (similarity scales differ too much between models to guess one).
DEFAULT_PROFILE = FusionProfile(
    0.3, 6.0, 0.7, 20, None, None, 0.0, 0.4, exact_lead_sources=EXACT_LEAD_SOURCES
)


@dataclass(frozen=True, slots=True)
class SearchTuning:
    """The operator's overrides of the measured :class:`FusionProfile` (None keeps it).

    Every caller (the bot, ``kb search``, the demo) builds it with :meth:`from_settings`,
    so a setting such as ``SEARCH_MIN_SIMILARITY`` means the same everywhere.
    """

    vector_share: float | None = None
    min_similarity: float | None = None
    min_coverage: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchTuning:
        """``HYBRID_VECTOR_SHARE``, ``SEARCH_MIN_SIMILARITY``, ``SEARCH_MIN_COVERAGE``."""
        return cls(
            vector_share=settings.hybrid_vector_share,
            min_similarity=settings.search_min_similarity,
            min_coverage=settings.search_min_coverage,
        )


def fusion_profile(model: str | None) -> FusionProfile:
    """The measured profile of ``model``, or the default for unmeasured models."""
    return FUSION_PROFILES.get(model or "", DEFAULT_PROFILE)


@dataclass(frozen=True, slots=True)
class RankedHit:
    """A search result with how each mode ranked it (1-based; None = not found by it).

    ``vector_part`` and ``keyword_part`` are the two terms of the fused score (hybrid
    only; they add up to ``score``), so a reader can see which half put a hit where.
    """

    hit: SearchHit
    score: float
    vector_rank: int | None = None
    keyword_rank: int | None = None
    vector_part: float = 0.0
    keyword_part: float = 0.0
    exact_lead: bool = False
    """Ranked first by the exact-match lead, not by its score (hybrid only)."""

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
            "coverage": None if h.coverage is None else round(h.coverage, 6),
            "vector_rank": self.vector_rank,
            "keyword_rank": self.keyword_rank,
            "vector_part": round(self.vector_part, 6),
            "keyword_part": round(self.keyword_part, 6),
            "exact_lead": self.exact_lead,
            "guild_id": h.guild_id,
            "channel_id": h.channel_id,
            "content": h.content,
            "metadata": h.metadata,
        }


@dataclass(frozen=True, slots=True)
class FloorCheck:
    """What the relevance floor compared for one hybrid query, and its verdict."""

    best_similarity: float | None
    """Best cosine similarity of the vector half (None = no vector list)."""
    best_coverage: float | None
    """Best keyword coverage (None = no keyword list)."""
    min_similarity: float | None
    min_coverage: float | None
    passed: bool
    """True when one half vouches for the query (the hits are shown)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "best_similarity": _round(self.best_similarity),
            "best_coverage": _round(self.best_coverage),
            "min_similarity": self.min_similarity,
            "min_coverage": self.min_coverage,
            "passed": self.passed,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The ranked hits and what happened on the way (e.g. a failed query embedding).

    When the relevance floor turned the query away, ``hits`` is empty and ``dropped``
    holds what would have been shown; ``floor`` has the numbers it compared.
    """

    hits: list[RankedHit]
    mode: str
    warnings: list[str] = field(default_factory=list)
    dropped: list[RankedHit] = field(default_factory=list)
    floor: FloorCheck | None = None


def fuse(
    vector_hits: list[SearchHit],
    keyword_hits: list[SearchHit],
    profile: FusionProfile,
    *,
    top_k: int,
    query_language: float | None = None,
) -> list[RankedHit]:
    """Score fusion of the two lists (see the module docstring); ties by chunk id.

    ``query_language`` is the query's share of Japanese letters
    (:func:`kotonoha_bot.text.japanese_share`); without it, or with a profile whose
    ``language_bonus`` is 0, no language gap is added.
    """
    entries: dict[int, dict[str, Any]] = {}
    vec = vector_hits[: profile.depth]
    bonus = profile.language_bonus if query_language is not None else 0.0
    if vec:
        sims = [h.similarity if h.similarity is not None else h.score for h in vec]
        top, low = sims[0], sims[-1]
        span = max(top - low, 1e-9)
        for rank, (hit, sim) in enumerate(zip(vec, sims, strict=True), start=1):
            e = entries.setdefault(hit.chunk_id, _entry(hit))
            part = (sim - low) / span if len(vec) > 1 else 1.0
            if bonus and query_language is not None:
                part += bonus * abs(query_language - japanese_share(hit.content))
            e["vector_part"] = profile.vector_share * part
            e["vector_rank"] = rank
    kw = keyword_hits[: profile.depth]
    if kw:
        best = max(h.score for h in kw) or 1.0
        best_coverage = max(h.coverage or 0.0 for h in kw)
        trust = 1.0
        if profile.coverage_gate > 0 and best_coverage < profile.coverage_gate:
            trust = (best_coverage / profile.coverage_gate) ** 2
        for rank, hit in enumerate(kw, start=1):
            coverage = hit.coverage if hit.coverage is not None else 0.0
            e = entries.setdefault(hit.chunk_id, _entry(hit))
            if e["hit"].coverage is None:
                e["hit"] = replace(e["hit"], coverage=hit.coverage)
            e["keyword_part"] = (
                (1.0 - profile.vector_share)
                * trust
                * (
                    profile.coverage_share * coverage**profile.coverage_power
                    + (1.0 - profile.coverage_share) * hit.score / best
                )
            )
            e["keyword_rank"] = rank
    lead = profile.keyword_lead
    exact = _exact_lead(kw, profile.exact_lead_sources)
    leading = _leading_groups(vec if profile.leading_half == "vector" else kw, profile)
    for e in entries.values():
        e["score"] = e["vector_part"] + e["keyword_part"]
        e["group"] = leading.get(e["hit"].chunk_id, len(leading))
        # Lead hits first, in the keyword list's own order (ties among full matches are
        # the keyword side's to break: similarity cannot tell two chunks naming a code).
        e["lead"] = (
            e["keyword_rank"]
            if lead > 0 and e["keyword_rank"] is not None and (e["hit"].coverage or 0.0) >= lead
            else None
        )
    ranked = sorted(
        entries.values(),
        key=lambda e: (
            e["hit"].chunk_id != exact,
            e["lead"] is None,
            e["lead"] or 0,
            e["group"],
            -e["score"],
            e["hit"].chunk_id,
        ),
    )
    return [
        RankedHit(
            hit=e["hit"],
            score=e["score"],
            vector_rank=e["vector_rank"],
            keyword_rank=e["keyword_rank"],
            vector_part=e["vector_part"],
            keyword_part=e["keyword_part"],
            exact_lead=e["hit"].chunk_id == exact,
        )
        for e in ranked[:top_k]
    ]


def _exact_lead(keyword_hits: list[SearchHit], max_sources: int) -> int | None:
    """The chunk id the exact-match lead puts first, or None (see ``exact_lead_sources``)."""
    if max_sources <= 0:
        return None
    whole = [h for h in keyword_hits if (h.coverage or 0.0) >= FULL_COVERAGE]
    if not whole or len({h.source_id for h in whole}) > max_sources:
        return None
    return whole[0].chunk_id


def _leading_groups(hits: list[SearchHit], profile: FusionProfile) -> dict[int, int]:
    """chunk id -> place of its score in the leading half's list (see ``leading_half``).

    Hits the leading half scores the same share a place, so the fused score orders
    them; without a leading half, every hit has the same (empty) place.
    """
    if profile.leading_half is None:
        return {}
    groups: dict[int, int] = {}
    place, previous = -1, None
    for hit in hits:
        value = hit.similarity if hit.similarity is not None else hit.score
        if previous is None or not math.isclose(value, previous, rel_tol=1e-9, abs_tol=1e-12):
            place = place + 1
        previous = value
        groups.setdefault(hit.chunk_id, place)
    return groups


def _entry(hit: SearchHit) -> dict[str, Any]:
    return {
        "hit": hit,
        "vector_part": 0.0,
        "keyword_part": 0.0,
        "vector_rank": None,
        "keyword_rank": None,
    }


def floor_check(
    vector_hits: list[SearchHit], keyword_hits: list[SearchHit], profile: FusionProfile
) -> FloorCheck:
    """The relevance floor: does either half vouch for some hit of the query?

    A query is answered when its best vector hit reaches ``min_similarity`` or its best
    keyword hit reaches ``min_coverage``; a side without a floor (None) always vouches
    when it found anything. Without a vector list (no embedder, service down) only the
    keyword side decides.
    """
    best_sim = max((h.similarity for h in vector_hits if h.similarity is not None), default=None)
    best_cov = max((h.coverage or 0.0 for h in keyword_hits), default=None)
    passed = (
        (profile.min_similarity is None and bool(vector_hits))
        or (profile.min_coverage is None and bool(keyword_hits))
        or (
            profile.min_similarity is not None
            and best_sim is not None
            and best_sim >= profile.min_similarity
        )
        or (
            profile.min_coverage is not None
            and best_cov is not None
            and best_cov >= profile.min_coverage
        )
    )
    return FloorCheck(best_sim, best_cov, profile.min_similarity, profile.min_coverage, passed)


def nothing_relevant(
    vector_hits: list[SearchHit], keyword_hits: list[SearchHit], profile: FusionProfile
) -> bool:
    """True when the relevance floor turns the query away (see :func:`floor_check`)."""
    return not floor_check(vector_hits, keyword_hits, profile).passed


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
    vector_share: float | None = None,
    min_similarity: float | None = None,
    min_coverage: float | None = None,
    floor: bool = True,
    tuning: SearchTuning | None = None,
) -> SearchResult:
    """Search one guild's knowledge (optionally one channel) in the given mode.

    ``tuning`` (the settings' overrides) and, above it, ``vector_share``,
    ``min_similarity`` and ``min_coverage`` override the embedder's
    :class:`FusionProfile`; ``floor=False`` turns the relevance floor off (benchmarks).
    """
    if tuning is not None:
        vector_share = tuning.vector_share if vector_share is None else vector_share
        min_similarity = tuning.min_similarity if min_similarity is None else min_similarity
        min_coverage = tuning.min_coverage if min_coverage is None else min_coverage
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
    text = normalize_for_query(query)
    warnings: list[str] = []
    profile = fusion_profile(embedder.model if embedder is not None else None)
    if vector_share is not None:
        profile = replace(profile, vector_share=vector_share)
    if min_similarity is not None:
        profile = replace(profile, min_similarity=min_similarity)
    if min_coverage is not None:
        profile = replace(profile, min_coverage=min_coverage)
    depth = top_k if mode != "hybrid" else max(top_k, profile.depth)
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
                    min_similarity=min_similarity if mode == "vector" else None,
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
        hits = fuse(
            vector_hits, keyword_hits, profile, top_k=top_k, query_language=japanese_share(text)
        )
        check = floor_check(vector_hits, keyword_hits, profile)
        if floor and not check.passed:
            return SearchResult(hits=[], mode=mode, warnings=warnings, dropped=hits, floor=check)
        return SearchResult(hits=hits, mode=mode, warnings=warnings, floor=check)
    return SearchResult(hits=hits, mode=mode, warnings=warnings)
