"""Tune hybrid search's FusionProfile per embedder on the dev half; check it on the test half.

    .venv/bin/python -m benchmarks.tune_fusion [--floor-kept 0.95] [--sample N] [--embedder NAME]

Builds the example knowledge base once per embedder (as bench_retrieval does), asks
the database for each labelled query's vector and keyword candidates once, then
scores every profile of a grid with the real fusion function
(``kotonoha_bot.knowledge.search.fuse``) — no database calls per profile.
``--sample N`` scores N profiles of the grid drawn with a fixed seed (the whole grid
takes ~20 min per embedder on this machine), and the ``--refine`` best of them are
walked further by coordinate ascent over the grid's values; ``--embedder`` tunes one
embedder; ``--cache DIR`` keeps each embedder's candidates between runs; ``--check`` only
scores the shipped profiles: their worst margin on each half, the share of
bootstrap resamples of that half in which hybrid is >= both halves in every class,
and how many queries rank below their better half.

Objective on dev, per embedder: for every class and both recall@5 and MRR, the
*margin* of hybrid over the better of vector and keyword. The profile whose worst
margin is highest wins (hybrid must never lose to its halves); among those, the
one with the most cushion (the sum of every margin capped at 0.03, so one class
far ahead does not buy a thin one), then the highest sum of hybrid scores. The
relevance floor is chosen after: the (similarity, coverage) pair that rejects the
most no-answer queries while the answerable ones keep at least 95 % of their
recall. The exact-match lead (``exact_lead_sources``) is a fixed rule, not tuned:
every profile of the grid has the shipped value. The leading half
(``leading_half``: none, keyword or vector) is a field of the grid like the
weights: a profile that leads with one half is never below that half, and the
objective decides whether that beats every weighting. The profiles printed here are
the ones in ``FUSION_PROFILES``; the test half is only printed, never used to
choose.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import pickle
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_retrieval import CLASSES, CONVERSATIONS, CORPUS, QUERIES, embedders
from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.knowledge.chunking import normalize_for_query
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.knowledge.evaluation import (
    LabelledQuery,
    build_example_knowledge,
    distinct,
    load_queries,
    score_query,
    source_name,
)
from kotonoha_bot.knowledge.search import (
    EXACT_LEAD_SOURCES,
    FusionProfile,
    fuse,
    fusion_profile,
    nothing_relevant,
)
from kotonoha_bot.models import SearchHit
from kotonoha_bot.text import japanese_share

DEPTH = 20
CUSHION = 0.03

Table = dict[str, dict[str, tuple[float, float]]]


@dataclass
class Candidates:
    vector: list[SearchHit]
    keyword: list[SearchHit]
    language: float


def sources(hits: list[SearchHit]) -> list[str]:
    return distinct(source_name(h.source_uri) for h in hits)


def hybrid_sources(c: Candidates, profile: FusionProfile) -> list[str]:
    fused = fuse(c.vector, c.keyword, profile, top_k=2 * DEPTH, query_language=c.language)
    return sources([r.hit for r in fused])


def table(
    queries: list[LabelledQuery], cands: dict[str, Candidates], profile: FusionProfile | None
) -> Table:
    """mode -> class -> (recall@5, MRR); hybrid with ``profile`` and no floor."""
    out: Table = {}
    for mode in ("vector", "keyword", "hybrid"):
        if mode == "hybrid" and profile is None:
            continue
        per: dict[str, list[tuple[float, float]]] = {}
        for q in queries:
            if not q.relevant:
                continue
            c = cands[q.id]
            if mode == "vector":
                ranked = sources(c.vector)
            elif mode == "keyword":
                ranked = sources(c.keyword)
            else:
                assert profile is not None
                ranked = hybrid_sources(c, profile)
            per.setdefault(q.cls, []).append(score_query(ranked, q.relevant))
        out[mode] = {
            cls: (sum(r for r, _ in v) / len(v), sum(m for _, m in v) / len(v))
            for cls, v in per.items()
        }
    return out


def margins(t: Table, halves: Table) -> list[float]:
    """Hybrid minus the better half, per class and metric (negative = hybrid loses)."""
    return [
        t["hybrid"][c][j] - max(halves["vector"][c][j], halves["keyword"][c][j])
        for c in CLASSES
        for j in (0, 1)
    ]


def objective(t: Table, halves: Table) -> tuple[float, float, float]:
    m = margins(t, halves)
    return (
        round(min(m), 6),
        round(sum(min(x, CUSHION) for x in m), 6),
        sum(t["hybrid"][c][0] + t["hybrid"][c][1] for c in CLASSES),
    )


def floor_quality(
    queries: list[LabelledQuery],
    cands: dict[str, Candidates],
    profile: FusionProfile,
    recalls: dict[str, float] | None = None,
) -> tuple[float, float]:
    """(no-answer precision, answerable recall kept) of ``profile``'s floor.

    ``recalls`` (:func:`hybrid_recalls` of the same profile) saves fusing every query
    again: the floor only decides whether the fused list is shown.
    """
    if recalls is None:
        recalls = hybrid_recalls(queries, cands, profile)
    rejected = n_none = 0
    recall_raw = recall_floor = 0.0
    for q in queries:
        c = cands[q.id]
        empty = nothing_relevant(c.vector[: profile.depth], c.keyword[: profile.depth], profile)
        if not q.relevant:
            n_none += 1
            rejected += empty
            continue
        r = recalls[q.id]
        recall_raw += r
        recall_floor += 0.0 if empty else r
    return rejected / max(n_none, 1), recall_floor / recall_raw if recall_raw else 1.0


def hybrid_recalls(
    queries: list[LabelledQuery], cands: dict[str, Candidates], profile: FusionProfile
) -> dict[str, float]:
    """Recall@5 of hybrid without the floor, per answerable query."""
    return {
        q.id: score_query(hybrid_sources(cands[q.id], profile), q.relevant)[0]
        for q in queries
        if q.relevant
    }


def tune_floor(
    queries: list[LabelledQuery],
    cands: dict[str, Candidates],
    profile: FusionProfile,
    kept: float,
) -> FusionProfile:
    best = (replace(profile, min_similarity=None, min_coverage=None), -1.0)
    sims = sorted({round(h.similarity or 0, 3) for c in cands.values() for h in c.vector[:1]})
    recalls = hybrid_recalls(queries, cands, profile)  # the floor leaves the order alone
    for sim, cov in itertools.product(sims, (0.6, 0.7, 0.8, 0.9, 1.0)):
        p = replace(profile, min_similarity=sim, min_coverage=cov)
        precision, k = floor_quality(queries, cands, p, recalls)
        if k >= kept and precision > best[1]:
            best = (p, precision)
    return best[0]


#: The values tried for each field of FusionProfile (floors are tuned after).
GRID: dict[str, tuple[Any, ...]] = {
    "vector_share": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "coverage_power": (1.0, 2.0, 4.0, 6.0),
    "coverage_share": (0.7, 0.8, 0.9, 1.0),
    "depth": (10, 20),
    "coverage_gate": (0.0, 0.5, 0.7, 0.9),
    "language_bonus": (0.0, 0.2, 0.4, 0.6, 1.0),
    "keyword_lead": (0.0, 0.8, 0.99),
    "leading_half": (None, "keyword", "vector"),
}


def grid(sample: int = 0) -> list[FusionProfile]:
    """The profiles tried; ``sample`` > 0 draws that many with a fixed seed."""
    profiles = [
        FusionProfile(a, p, b, int(d), None, None, g, lang, lead, EXACT_LEAD_SOURCES, half)
        for a, p, b, d, g, lang, lead, half in itertools.product(*GRID.values())
    ]
    if sample:
        random.Random(11).shuffle(profiles)
        profiles = profiles[:sample]
    return profiles


def refine(
    start: FusionProfile, score: Callable[[FusionProfile], tuple[float, float, float]]
) -> tuple[FusionProfile, tuple[float, float, float]]:
    """Coordinate ascent over GRID from ``start`` until no single field change helps.

    A sample of the grid finds the region; this walks to the best profile near it at a
    fraction of the whole grid's cost (same objective, dev half only).
    """
    best, best_score = start, score(start)
    improved = True
    while improved:
        improved = False
        for name, values in GRID.items():
            for value in values:
                change: dict[str, Any] = {name: value}
                p = replace(best, **change)
                if p == best:
                    continue
                sc = score(p)
                if sc > best_score:
                    best, best_score, improved = p, sc, True
    return best, best_score


async def cached_candidates(
    name: str, emb: EmbeddingProvider, tmp: Path, queries: list[LabelledQuery], cache_dir: str
) -> dict[str, Candidates]:
    """``candidates``, kept in ``cache_dir`` (when given) so a re-run skips the embedding."""
    cache = Path(cache_dir) / f"candidates-{name}.pickle" if cache_dir else None
    if cache is not None and cache.exists():
        cands: dict[str, Candidates] = pickle.loads(cache.read_bytes())
        return cands
    cands = await candidates(name, emb, tmp, queries)
    if cache is not None:
        cache.write_bytes(pickle.dumps(cands))
    return cands


async def candidates(
    name: str, emb: EmbeddingProvider, tmp: Path, queries: list[LabelledQuery]
) -> dict[str, Candidates]:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    cands: dict[str, Candidates] = {}
    async with open_database(f"sqlite:///{tmp / f'{name}.db'}", settings=settings) as db:
        await build_example_knowledge(db, emb, CORPUS, CONVERSATIONS)
        for q in queries:
            text = normalize_for_query(q.query)
            qvec = (await emb.embed_queries([text]))[0]
            cands[q.id] = Candidates(
                await db.similarity_search(qvec, guild_id=1, top_k=DEPTH),
                await db.keyword_search(text, guild_id=1, top_k=DEPTH),
                japanese_share(text),
            )
    return cands


def per_query(
    queries: list[LabelledQuery], cands: dict[str, Candidates], profile: FusionProfile
) -> tuple[list[int], np.ndarray]:
    """Class index and (vector, keyword, hybrid) x (recall@5, RR) of each answerable query."""
    classes: list[int] = []
    rows: list[list[tuple[float, float]]] = []
    for q in queries:
        if not q.relevant:
            continue
        c = cands[q.id]
        classes.append(CLASSES.index(q.cls))
        rows.append(
            [
                score_query(sources(c.vector), q.relevant),
                score_query(sources(c.keyword), q.relevant),
                score_query(hybrid_sources(c, profile), q.relevant),
            ]
        )
    return classes, np.array(rows)


def robustness(classes: list[int], rows: np.ndarray, draws: int = 1000) -> tuple[float, int]:
    """Share of bootstrap resamples (within each class) where hybrid >= both halves in
    every class and metric, and the number of queries where hybrid is below the better
    half on either metric.

    It says how much "hybrid >= both in every cell" of one half of 31 queries a class
    is luck: a fusion whose per-query losses and wins balance passes in about as many
    resamples as it fails.
    """
    rng = np.random.default_rng(11)
    cls = np.array(classes)
    members = [np.flatnonzero(cls == c) for c in range(len(CLASSES))]
    ok = 0
    for _ in range(draws):
        passed = True
        for idx in members:
            pick = rows[rng.choice(idx, len(idx))]
            mean = pick.mean(axis=0)  # (3 modes, 2 metrics)
            if np.any(mean[2] < np.maximum(mean[0], mean[1]) - 1e-9):
                passed = False
                break
        ok += passed
    losses = int(np.sum(np.any(rows[:, 2] < np.maximum(rows[:, 0], rows[:, 1]) - 1e-9, axis=1)))
    return ok / draws, losses


def check_shipped(
    name: str,
    model: str,
    cands: dict[str, Candidates],
    dev: list[LabelledQuery],
    test: list[LabelledQuery],
) -> None:
    """``--check``: the shipped profile's margins and how robust they are, dev and test."""
    profile = fusion_profile(model)
    print(f"\n== {name} ({model}): shipped profile {profile}")
    for split, qs in (("dev", dev), ("test", test)):
        t = table(qs, cands, profile)
        share, losses = robustness(*per_query(qs, cands, profile))
        m = margins(t, t)
        print(
            f"  {split}: worst margin {min(m):+.3f}; hybrid >= both in every class in"
            f" {share:.0%} of bootstrap resamples; {losses} of"
            f" {sum(1 for q in qs if q.relevant)} queries below their better half"
        )


async def main(args: argparse.Namespace) -> None:
    all_queries = load_queries(QUERIES)
    dev = [q for q in all_queries if q.split == "dev"]
    test = [q for q in all_queries if q.split == "test"]
    tmp = Path(tempfile.mkdtemp(prefix="kotonoha-tune-"))
    profiles = grid(args.sample)
    with contextlib.ExitStack() as stack:
        for name, emb in embedders(stack):
            if args.embedder and name != args.embedder:
                await emb.aclose()
                continue
            cands = await cached_candidates(name, emb, tmp, all_queries, args.cache)
            await emb.aclose()
            if args.check:
                check_shipped(name, emb.model, cands, dev, test)
                continue
            halves = table(dev, cands, None)

            def score(p: FusionProfile) -> tuple[float, float, float]:
                return objective(table(dev, cands, p), halves)  # noqa: B023

            scored = sorted(
                ((score(p), i) for i, p in enumerate(profiles)),
                key=lambda x: (-x[0][0], -x[0][1], -x[0][2], x[1]),
            )
            walked = [refine(profiles[i], score) for _, i in scored[: args.refine]]
            walked.append((profiles[scored[0][1]], scored[0][0]))
            chosen, (worst, cushion, _) = max(walked, key=lambda x: x[1])
            best = tune_floor(dev, cands, chosen, args.floor_kept)
            print(
                f"\n== {name}: best on dev (worst margin {worst:+.3f}, cushion {cushion:.3f}):"
                f" {best}"
            )
            for split, qs in (("dev", dev), ("test", test)):
                t = table(qs, cands, best)
                precision, kept = floor_quality(qs, cands, best)
                m = margins(t, t)
                print(
                    f"  {split}: worst margin {min(m):+.3f};"
                    f" no-answer rejected {precision:.2f}; recall kept {kept:.2f}"
                )
                for cls in CLASSES:
                    v, k, h = (t[mode][cls] for mode in ("vector", "keyword", "hybrid"))
                    print(
                        f"    {cls:13} vector {v[0]:.3f}/{v[1]:.3f}"
                        f"  keyword {k[0]:.3f}/{k[1]:.3f}  hybrid {h[0]:.3f}/{h[1]:.3f}"
                    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floor-kept", type=float, default=0.95)
    parser.add_argument("--sample", type=int, default=0, help="profiles drawn from the grid")
    parser.add_argument("--embedder", default="", help="tune only this one")
    parser.add_argument("--refine", type=int, default=3, help="best samples walked further")
    parser.add_argument("--cache", default="", help="folder keeping each embedder's candidates")
    parser.add_argument(
        "--check", action="store_true", help="only score the shipped profiles (no tuning)"
    )
    asyncio.run(main(parser.parse_args()))
