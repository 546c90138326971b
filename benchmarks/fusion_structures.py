"""Fusion structures other than the shipped one, scored on the same candidates.

    .venv/bin/python -m benchmarks.fusion_structures [--cache DIR]

Round 3 of issue 11 asked for a fusion that is structurally hard to push below its
halves. This replays the structures tried on each embedder's cached candidates (as
``benchmarks.tune_fusion`` collects them: 20 vector and 20 keyword hits a query) and
prints, for the dev half (where a choice is made) and the test half, the worst
margin of hybrid over the better half across the 4 classes x (recall@5, MRR) and the
cells below it. Each structure starts from the shipped profile of the embedder:

* ``shipped``: the score fusion with the exact-match lead (what the bot runs);
* ``no exact lead``: the same without it (round 2);
* ``vector pin``: the vector half's first source ranked first when its similarity
  beats the next source's by at least 0.1;
* ``top-1 guard``: both halves' first sources in the first two places;
* ``vector under gate``: the vector half's own order when the best keyword coverage
  is under 0.5 (keyword hits only fill in below);
* ``source RRF``: reciprocal-rank fusion of the two source lists (k = 2, equal weights);
* ``code lead``: the first keyword hit containing every code-like token of the query
  (``LT-1219``, ``strings_en.csv``) ranked first when at most three sources hold them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.bench_retrieval import CLASSES, QUERIES, embedders
from benchmarks.tune_fusion import Candidates, cached_candidates, hybrid_sources, sources
from kotonoha_bot.knowledge.evaluation import LabelledQuery, load_queries, score_query, source_name
from kotonoha_bot.knowledge.search import FusionProfile, fusion_profile

Structure = Callable[[Candidates, LabelledQuery, FusionProfile], list[str]]
CODE = re.compile(r"#?[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)+|#[\w-]+|[A-Za-z]+\d+\w*")


def first(ranked: list[str], lead: str) -> list[str]:
    return [lead, *(s for s in ranked if s != lead)]


def vector_pin(c: Candidates, q: LabelledQuery, p: FusionProfile) -> list[str]:
    base = hybrid_sources(c, p)
    best: dict[str, float] = {}
    for h in c.vector:
        best.setdefault(source_name(h.source_uri), h.similarity or 0.0)
    sims = list(best.values())
    if len(sims) > 1 and sims[0] - sims[1] >= 0.1:
        return first(base, next(iter(best)))
    return base


def top1_guard(c: Candidates, q: LabelledQuery, p: FusionProfile) -> list[str]:
    base = hybrid_sources(c, p)
    tops = [s[0] for s in (sources(c.vector), sources(c.keyword)) if s]
    return [*(s for s in base if s in tops), *(s for s in base if s not in tops)]


def vector_under_gate(c: Candidates, q: LabelledQuery, p: FusionProfile) -> list[str]:
    base = hybrid_sources(c, p)
    if c.vector and max((h.coverage or 0.0 for h in c.keyword), default=0.0) < 0.5:
        own = sources(c.vector)
        return own + [s for s in base if s not in own]
    return base


def source_rrf(c: Candidates, q: LabelledQuery, p: FusionProfile) -> list[str]:
    score: dict[str, float] = {}
    for ranked in (sources(c.vector[: p.depth]), sources(c.keyword[: p.depth])):
        for rank, s in enumerate(ranked, 1):
            score[s] = score.get(s, 0.0) + 0.5 / (2 + rank)
    return sorted(score, key=lambda s: (-score[s], s))


def code_lead(c: Candidates, q: LabelledQuery, p: FusionProfile) -> list[str]:
    base = hybrid_sources(c, p)
    codes = [t.lower() for t in CODE.findall(q.query) if len(t) >= 3]
    holding = [h for h in c.keyword if codes and all(t in h.content.lower() for t in codes)]
    if holding and len({h.source_id for h in holding}) <= 3:
        return first(base, source_name(holding[0].source_uri))
    return base


STRUCTURES: dict[str, Structure] = {
    "shipped": lambda c, q, p: hybrid_sources(c, p),
    "no exact lead": lambda c, q, p: hybrid_sources(c, replace(p, exact_lead_sources=0)),
    "vector pin": vector_pin,
    "top-1 guard": top1_guard,
    "vector under gate": vector_under_gate,
    "source RRF": source_rrf,
    "code lead": code_lead,
}


def cells(
    queries: list[LabelledQuery], cands: dict[str, Candidates], p: FusionProfile, s: Structure
) -> tuple[float, list[str]]:
    """Worst margin and the cells (class/metric) where hybrid is below the better half."""
    per: dict[str, list[tuple[tuple[float, float], ...]]] = {}
    for q in queries:
        if q.relevant:
            c = cands[q.id]
            per.setdefault(q.cls, []).append(
                tuple(
                    score_query(r, q.relevant)
                    for r in (sources(c.vector), sources(c.keyword), s(c, q, p))
                )
            )
    worst, misses = 9.0, []
    for cls in CLASSES:
        rows = per[cls]
        for j, metric in ((0, "R@5"), (1, "MRR")):
            v, k, h = (sum(r[m][j] for r in rows) / len(rows) for m in range(3))
            margin = h - max(v, k)
            worst = min(worst, margin)
            if margin < -1e-9:
                misses.append(f"{cls} {metric} {margin:+.3f}")
    return worst, misses


async def main(args: argparse.Namespace) -> None:
    queries = load_queries(QUERIES)
    halves = {s: [q for q in queries if q.split == s] for s in ("dev", "test")}
    tmp = Path(tempfile.mkdtemp(prefix="kotonoha-structures-"))
    print("| embedder | structure | dev worst | dev cells below | test worst | test cells below |")
    print("|---|---|---|---|---|---|")
    with contextlib.ExitStack() as stack:
        for name, emb in embedders(stack):
            cands = await cached_candidates(name, emb, tmp, queries, args.cache)
            profile = fusion_profile(emb.model)
            await emb.aclose()
            for label, structure in STRUCTURES.items():
                (dw, dm), (tw, tm) = (cells(halves[s], cands, profile, structure) for s in halves)
                print(
                    f"| {name} | {label} | {dw:+.3f} | {'; '.join(dm) or '-'} | {tw:+.3f}"
                    f" | {'; '.join(tm) or '-'} |"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="", help="folder keeping each embedder's candidates")
    asyncio.run(main(parser.parse_args()))
