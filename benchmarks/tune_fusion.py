"""Tune hybrid search's FusionProfile per embedder on the dev half; check it on the test half.

    .venv/bin/python -m benchmarks.tune_fusion

Builds the example knowledge base once per embedder (as bench_retrieval does), asks
the database for each labelled query's vector and keyword candidates once, then
scores every profile of a grid with the real fusion function
(``kotonoha_bot.knowledge.search.fuse``) — no database calls per profile.

Objective on dev, per embedder: the smallest total *deficit* (over classes and both
recall@5 and MRR, how far hybrid falls below the better of vector and keyword),
then the highest sum of hybrid scores. The relevance floor is chosen after: the
(similarity, coverage) pair that rejects the most no-answer queries while the
answerable ones keep at least 95 % of their recall. The profiles printed here are
the ones in ``FUSION_PROFILES``; the test-half numbers are what bench_retrieval
reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.bench_retrieval import CLASSES, CONVERSATIONS, CORPUS, QUERIES, embedders
from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.knowledge.chunking import normalize_for_query
from kotonoha_bot.knowledge.evaluation import (
    LabelledQuery,
    build_example_knowledge,
    distinct,
    load_queries,
    score_query,
    source_name,
)
from kotonoha_bot.knowledge.search import FusionProfile, fuse, nothing_relevant
from kotonoha_bot.models import SearchHit

DEPTH = 20
KEPT = 0.95


@dataclass
class Candidates:
    vector: list[SearchHit]
    keyword: list[SearchHit]


def sources(hits: list[SearchHit]) -> list[str]:
    return distinct(source_name(h.source_uri) for h in hits)


def table(
    queries: list[LabelledQuery], cands: dict[str, Candidates], profile: FusionProfile | None
) -> dict[str, dict[str, tuple[float, float]]]:
    """mode -> class -> (recall@5, MRR); hybrid with ``profile`` and no floor."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for mode in ("vector", "keyword", "hybrid"):
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
                ranked = sources([r.hit for r in fuse(c.vector, c.keyword, profile, top_k=20)])
            per.setdefault(q.cls, []).append(score_query(ranked, q.relevant))
        out[mode] = {
            cls: (sum(r for r, _ in v) / len(v), sum(m for _, m in v) / len(v))
            for cls, v in per.items()
        }
    return out


def deficit(t: dict[str, dict[str, tuple[float, float]]]) -> float:
    return sum(
        max(0.0, max(t["vector"][c][j], t["keyword"][c][j]) - t["hybrid"][c][j])
        for c in CLASSES
        for j in (0, 1)
    )


def total(t: dict[str, dict[str, tuple[float, float]]]) -> float:
    return sum(t["hybrid"][c][0] + t["hybrid"][c][1] for c in CLASSES)


def floor_quality(
    queries: list[LabelledQuery], cands: dict[str, Candidates], profile: FusionProfile
) -> tuple[float, float]:
    """(no-answer precision, answerable recall kept) of ``profile``'s floor."""
    rejected = n_none = 0
    recall_raw = recall_floor = 0.0
    for q in queries:
        c = cands[q.id]
        empty = nothing_relevant(c.vector[: profile.depth], c.keyword[: profile.depth], profile)
        if not q.relevant:
            n_none += 1
            rejected += empty
            continue
        ranked = sources([r.hit for r in fuse(c.vector, c.keyword, profile, top_k=20)])
        r, _ = score_query(ranked, q.relevant)
        recall_raw += r
        recall_floor += 0.0 if empty else r
    return rejected / max(n_none, 1), recall_floor / recall_raw if recall_raw else 1.0


def tune_floor(
    queries: list[LabelledQuery], cands: dict[str, Candidates], profile: FusionProfile
) -> FusionProfile:
    best = (replace(profile, min_similarity=None, min_coverage=None), -1.0)
    sims = sorted({round(h.similarity or 0, 3) for c in cands.values() for h in c.vector[:1]})
    for sim, cov in itertools.product(sims, (0.6, 0.7, 0.8, 0.9, 1.0)):
        p = replace(profile, min_similarity=sim, min_coverage=cov)
        precision, kept = floor_quality(queries, cands, p)
        if kept >= KEPT and precision > best[1]:
            best = (p, precision)
    return best[0]


async def main() -> None:
    all_queries = load_queries(QUERIES)
    dev = [q for q in all_queries if q.split == "dev"]
    test = [q for q in all_queries if q.split == "test"]
    tmp = Path(tempfile.mkdtemp(prefix="kotonoha-tune-"))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    grid = [
        FusionProfile(a, p, b, d, None, None, g)
        for a, p, b, d, g in itertools.product(
            (0.1, 0.2, 0.3, 0.4, 0.5),
            (1.0, 2.0, 4.0, 6.0),
            (0.8, 0.9, 1.0),
            (10, 20),
            (0.0, 0.5, 0.7, 0.9, 1.0),
        )
    ]
    with contextlib.ExitStack() as stack:
        for name, emb in embedders(stack):
            async with open_database(f"sqlite:///{tmp / f'{name}.db'}", settings=settings) as db:
                await build_example_knowledge(db, emb, CORPUS, CONVERSATIONS)
                cands: dict[str, Candidates] = {}
                for q in all_queries:
                    text = normalize_for_query(q.query)
                    qvec = (await emb.embed_queries([text]))[0]
                    cands[q.id] = Candidates(
                        await db.similarity_search(qvec, guild_id=1, top_k=DEPTH),
                        await db.keyword_search(text, guild_id=1, top_k=DEPTH),
                    )
            scored = []
            for profile in grid:
                t = table(dev, cands, profile)
                scored.append((round(deficit(t), 4), -total(t), profile))
            scored.sort(key=lambda x: (x[0], x[1]))
            best = tune_floor(dev, cands, scored[0][2])
            print(f"\n== {name}: best on dev (deficit {scored[0][0]:.3f}): {best}")
            for split, qs in (("dev", dev), ("test", test)):
                t = table(qs, cands, best)
                precision, kept = floor_quality(qs, cands, best)
                print(
                    f"  {split}: deficit {deficit(t):.3f}; no-answer rejected {precision:.2f};"
                    f" recall kept {kept:.2f}"
                )
                for cls in CLASSES:
                    v, k, h = (t[m][cls] for m in ("vector", "keyword", "hybrid"))
                    print(
                        f"    {cls:13} vector {v[0]:.2f}/{v[1]:.2f}  keyword {k[0]:.2f}/{k[1]:.2f}"
                        f"  hybrid {h[0]:.2f}/{h[1]:.2f}"
                    )
            await emb.aclose()


if __name__ == "__main__":
    asyncio.run(main())
