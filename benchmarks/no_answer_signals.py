"""How well can a relevance floor tell no-answer questions from answerable ones here?

    .venv/bin/python -m benchmarks.no_answer_signals

The goal for the floor is: no-answer queries get no reference in >= 90 % of cases
while answerable ones keep >= 95 % of their recall. This measures, per embedder,
every per-query signal a floor could use without reading the text for meaning:

* ``top``: best cosine similarity; ``margin``: best minus the next *source*'s best;
  ``gap10``: best minus the 10th hit; ``z50``: best as a z-score over the query's
  own first 50 similarities (its similarity distribution over the scope);
* ``coverage``: best keyword coverage (IDF share of the informative terms);
  ``missing``: IDF share of the query's terms found in no chunk at all;
  ``agree``: vector and keyword lists share their first source;
* ``logistic``: a logistic model over all of them, fit on the dev half.

For each signal it prints the ROC AUC (0.5 = chance) on the test half and the share
of no-answer queries a threshold turns away while answerable ones keep >= 95 % of
their recall — with the threshold chosen on dev (what a shipped default can do)
and chosen on the test half itself (an oracle: no threshold on that signal can do
better on these queries). Recall is that of vector search (hybrid is close).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.bench_retrieval import CONVERSATIONS, CORPUS, QUERIES, embedders
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
from kotonoha_bot.models import SearchHit
from kotonoha_bot.text import bm25_idf, keyword_tokens, query_terms

KEPT = 0.95
SIGNALS = ("top", "margin", "gap10", "z50", "coverage", "missing", "agree")


def signals(
    vec: list[SearchHit], kw: list[SearchHit], terms: list[str], df: Counter[str], n: int
) -> dict[str, float]:
    sims = [h.similarity or 0.0 for h in vec[:50]]
    firsts: dict[str, float] = {}
    for h in vec:
        firsts.setdefault(source_name(h.source_uri), h.similarity or 0.0)
    best = list(firsts.values())
    weights = {t: bm25_idf(df.get(t, 0), n) for t in terms}
    total = sum(weights.values()) or 1.0
    return {
        "top": sims[0],
        "margin": best[0] - best[1] if len(best) > 1 else best[0],
        "gap10": sims[0] - sims[min(9, len(sims) - 1)],
        "z50": (sims[0] - statistics.fmean(sims)) / (statistics.pstdev(sims) or 1.0),
        "coverage": max((h.coverage or 0.0 for h in kw), default=0.0),
        # negated so that, like the others, higher means "more likely answerable"
        "missing": -sum(w for t, w in weights.items() if not df.get(t)) / total,
        "agree": float(
            bool(kw) and source_name(kw[0].source_uri) == source_name(vec[0].source_uri)
        ),
    }


def auc(answerable: list[float], no_answer: list[float]) -> float:
    """P(an answerable query scores higher than a no-answer one), ties half."""
    wins = sum((a > b) + 0.5 * (a == b) for a in answerable for b in no_answer)
    return wins / (len(answerable) * len(no_answer))


def threshold_for(scores: list[tuple[float, float]]) -> float:
    """Highest threshold keeping >= KEPT of the recall of (score, recall) answerable rows."""
    total = sum(r for _, r in scores) or 1.0
    kept = 0.0
    for s, r in sorted(scores, reverse=True):
        kept += r
        if kept / total >= KEPT:
            return s
    return -math.inf


def rejected(threshold: float, no_answer: list[float]) -> float:
    return sum(s < threshold for s in no_answer) / len(no_answer)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> np.ndarray:
    w = np.zeros(x.shape[1])
    reg = l2 * np.diag(np.r_[0.0, np.ones(x.shape[1] - 1)])
    for _ in range(50):  # Newton steps
        p = 1.0 / (1.0 + np.exp(-x @ w))
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-6 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


async def measure(
    name: str, emb: EmbeddingProvider, tmp: Path, queries: list[LabelledQuery]
) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    rows: dict[str, tuple[dict[str, float], float]] = {}
    async with open_database(f"sqlite:///{tmp / f'{name}.db'}", settings=settings) as db:
        await build_example_knowledge(db, emb, CORPUS, CONVERSATIONS)
        probe = (await emb.embed_queries(["probe"]))[0]
        everything = await db.similarity_search(probe, guild_id=1, top_k=1000)
        df: Counter[str] = Counter(t for h in everything for t in set(keyword_tokens(h.content)))
        for q in queries:
            text = normalize_for_query(q.query)
            qvec = (await emb.embed_queries([text]))[0]
            vec = await db.similarity_search(qvec, guild_id=1, top_k=50)
            kw = await db.keyword_search(text, guild_id=1, top_k=20)
            recall = 0.0
            if q.relevant:
                ranked = distinct(source_name(h.source_uri) for h in vec)
                recall = score_query(ranked, q.relevant)[0]
            rows[q.id] = (signals(vec, kw, query_terms(text), df, len(everything)), recall)
    halves = {s: [q for q in queries if q.split == s] for s in ("dev", "test")}

    def split_rows(
        split: str, value: Callable[[str], float]
    ) -> tuple[list[tuple[float, float]], list[float]]:
        ans = [(value(q.id), rows[q.id][1]) for q in halves[split] if q.relevant]
        none = [value(q.id) for q in halves[split] if not q.relevant]
        return ans, none

    def feats(qid: str) -> np.ndarray:
        return np.array([rows[qid][0][s] for s in SIGNALS])

    dev_x = np.array([feats(q.id) for q in halves["dev"]])
    mu, sd = dev_x.mean(axis=0), dev_x.std(axis=0) + 1e-9

    def design(qid: str) -> np.ndarray:
        out: np.ndarray = np.r_[1.0, (feats(qid) - mu) / sd]
        return out

    y = np.array([1.0 if q.relevant else 0.0 for q in halves["dev"]])
    w = fit_logistic(np.array([design(q.id) for q in halves["dev"]]), y)

    def column(signal: str) -> Callable[[str], float]:
        return lambda qid: rows[qid][0][signal]

    columns = {s: column(s) for s in SIGNALS}
    columns["logistic"] = lambda qid: float(design(qid) @ w)
    print(f"\n{name} (test half: {len(halves['test'])} queries)\n")
    print("| signal | ROC AUC | no-answer turned away, threshold from dev | same, oracle on test |")
    print("|---|---|---|---|")
    for label, value in columns.items():
        dev_ans, _ = split_rows("dev", value)
        test_ans, test_none = split_rows("test", value)
        from_dev = threshold_for(dev_ans)
        kept = sum(r for s, r in test_ans if s >= from_dev) / (sum(r for _, r in test_ans) or 1)
        print(
            f"| {label} | {auc([s for s, _ in test_ans], test_none):.2f} |"
            f" {rejected(from_dev, test_none):.2f} (recall kept {kept:.2f}) |"
            f" {rejected(threshold_for(test_ans), test_none):.2f} |"
        )


async def main() -> None:
    queries = load_queries(QUERIES)
    tmp = Path(tempfile.mkdtemp(prefix="kotonoha-noanswer-"))
    with contextlib.ExitStack() as stack:
        for name, emb in embedders(stack):
            await measure(name, emb, tmp, queries)
            await emb.aclose()


if __name__ == "__main__":
    asyncio.run(main())
