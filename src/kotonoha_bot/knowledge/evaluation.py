"""Retrieval quality on a labelled set: the measurement the benchmark and the floors share.

A labelled set (``examples/queries.json``) lists queries with a class, a dev/test
split and every source that answers them (corpus files relative to the corpus
folder, archived conversations as ``session:{key}``; an empty list = nothing does).
:func:`build_example_knowledge` ingests the corpus and archives the example
conversations through the real code paths; :func:`evaluate` runs every query in
each mode and scores the first ``k`` *distinct sources*:

* recall@k: share of a query's relevant sources among them;
* MRR: 1 / rank of the first relevant one (0 when none);
* no-answer precision: share of no-answer queries that got no reference at all;
* recall kept: recall with the relevance floor / recall without it (answerable ones).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.knowledge.archive import archive_session
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider, embedding_config
from kotonoha_bot.knowledge.ingest import ingest_paths
from kotonoha_bot.knowledge.search import search_knowledge
from kotonoha_bot.models import ChatSession, Message

K = 5
NO_ANSWER = "no_answer"


@dataclass(frozen=True, slots=True)
class LabelledQuery:
    """One query of the labelled set."""

    id: str
    cls: str
    lang: str
    split: str
    query: str
    relevant: tuple[str, ...]


@dataclass
class ClassScore:
    """Quality of one class in one mode."""

    n: int = 0
    recall: float = 0.0
    mrr: float = 0.0
    no_answer_precision: float | None = None
    recall_unfloored: float = 0.0

    @property
    def recall_kept(self) -> float | None:
        """Recall with the floor relative to recall without it."""
        return self.recall / self.recall_unfloored if self.recall_unfloored else None


@dataclass
class Evaluation:
    """Per mode, per class scores (``all`` = every answerable query)."""

    scores: dict[str, dict[str, ClassScore]] = field(default_factory=dict)
    ranked: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def load_queries(path: Path, split: str | None = None) -> list[LabelledQuery]:
    """The labelled queries of ``path`` (only ``split`` when given)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    out = [
        LabelledQuery(q["id"], q["class"], q["lang"], q["split"], q["query"], tuple(q["relevant"]))
        for q in doc["queries"]
    ]
    return [q for q in out if split is None or q.split == split]


def load_conversations(path: Path) -> list[ChatSession]:
    """The example conversations as sessions (timestamps a minute apart)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    sessions = []
    for c in doc["conversations"]:
        start = datetime.fromisoformat(c["start"])
        names = sorted({a for _r, a, _t in c["messages"] if a})
        messages = [
            Message(
                role=role,
                content=text,
                timestamp=start + timedelta(minutes=i),
                author_name=author,
                author_id=None if author is None else 9000 + names.index(author),
            )
            for i, (role, author, text) in enumerate(c["messages"])
        ]
        sessions.append(
            ChatSession(
                session_key=c["session_key"],
                session_type=c["session_type"],
                messages=messages,
                guild_id=doc["guild_id"],
                channel_id=c.get("channel_id"),
                thread_id=c.get("thread_id"),
                user_id=c.get("user_id"),
            )
        )
    return sessions


async def build_example_knowledge(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider,
    corpus: Path,
    conversations: Path,
    *,
    guild_id: int = 1,
    max_chars: int = 800,
    overlap_chars: int = 100,
) -> int:
    """Ingest the corpus and archive the conversations; returns chunks written.

    ``max_chars`` / ``overlap_chars`` are the chunker's (the settings' defaults).
    """
    report = await ingest_paths(
        db, embedder, [corpus], guild_id=guild_id, max_chars=max_chars, overlap_chars=overlap_chars
    )
    await db.set_embedding_config(embedding_config(embedder))
    added = 0
    for session in load_conversations(conversations):
        session.guild_id = guild_id
        # Stored first, as the bot's sessions are: every archived chunk names its messages.
        if await db.load_session(session.session_key) is None:
            await db.save_session(session)
        added += await archive_session(db, embedder, session)
    return report.chunks + added


def source_name(uri: str, corpus_marker: str = "examples/corpus/") -> str:
    """A hit's source as the labelled set names it."""
    return uri.split(corpus_marker, 1)[-1]


def distinct(names: Iterable[str]) -> list[str]:
    """Names in first-seen order, without repeats."""
    return list(dict.fromkeys(names))


def score_query(ranked: Sequence[str], relevant: Sequence[str], k: int = K) -> tuple[float, float]:
    """(recall@k, reciprocal rank) of one answerable query."""
    top = list(ranked[:k])
    rel = set(relevant)
    rank = next((i for i, name in enumerate(top, 1) if name in rel), None)
    return len(rel & set(top)) / len(rel), 0.0 if rank is None else 1.0 / rank


async def evaluate(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider,
    queries: Sequence[LabelledQuery],
    *,
    modes: Sequence[str] = ("vector", "keyword", "hybrid"),
    guild_id: int = 1,
    **tuning: Any,
) -> Evaluation:
    """Run every query in every mode.

    ``hybrid`` is run twice: as the bot runs it (with the relevance floor, scores
    under ``hybrid``) and without the floor (``hybrid_raw``), so fusion can be
    compared with its two halves on equal terms and the floor's cost measured.
    """
    result = Evaluation()
    runs = [(m, m, True) for m in modes]
    if "hybrid" in modes:
        runs.append(("hybrid_raw", "hybrid", False))
    for name, mode, floor in runs:
        per: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
        result.ranked[name] = {}
        for q in queries:
            found = await search_knowledge(
                db,
                embedder,
                q.query,
                guild_id=guild_id,
                mode=mode,
                top_k=4 * K,
                floor=floor,
                **tuning,
            )
            ranked = distinct(source_name(h.hit.source_uri) for h in found.hits)
            result.ranked[name][q.id] = ranked
            if not q.relevant:
                per[q.cls].append((0.0, 0.0, not ranked))
                continue
            recall, rr = score_query(ranked, q.relevant)
            for key in (q.cls, "all"):
                per[key].append((recall, rr, False))
        result.scores[name] = {
            cls: (
                ClassScore(n=len(rows), no_answer_precision=sum(r[2] for r in rows) / len(rows))
                if cls == NO_ANSWER
                else ClassScore(
                    n=len(rows),
                    recall=sum(r[0] for r in rows) / len(rows),
                    mrr=sum(r[1] for r in rows) / len(rows),
                )
            )
            for cls, rows in per.items()
        }
    if "hybrid" in modes:
        for cls, score in result.scores["hybrid"].items():
            score.recall_unfloored = result.scores["hybrid_raw"][cls].recall
    return result
