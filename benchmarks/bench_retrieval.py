"""Retrieval quality and ingest throughput on the sample corpus.

    .venv/bin/python -m benchmarks.bench_retrieval [--database sqlite|postgres]

For every embedder available here (hashing always; local when the [local] extra is
installed; openai when OPENAI_API_KEY is set) the corpus under examples/corpus is
ingested into a fresh database and each labelled query in examples/queries.json is
run in vector, keyword and hybrid mode. Reported per mode: recall@5 (share of the
relevant files found among the first five distinct files) and MRR (1 / rank of the
first relevant file). Ingest throughput is measured with hashing and with the real
openai client against the fake OpenAI server on loopback (network + JSON cost, no
model time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.knowledge.embeddings.hashing import HashingEmbeddingProvider
from kotonoha_bot.knowledge.ingest import ingest_paths
from kotonoha_bot.knowledge.search import search_knowledge

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus"
QUERIES = ROOT / "examples" / "queries.json"
MODES = ("vector", "keyword", "hybrid")
K = 5


@dataclass
class Quality:
    recall: float
    mrr: float


def _files(uris: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for uri in uris:
        rel = uri.split("examples/corpus/", 1)[-1]
        seen.setdefault(rel, None)
    return list(seen)


async def evaluate(embedder: EmbeddingProvider, url: str) -> dict[str, Quality]:
    queries = json.loads(QUERIES.read_text(encoding="utf-8"))["queries"]
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    out: dict[str, Quality] = {}
    async with open_database(url, settings=settings) as db:
        await ingest_paths(db, embedder, [CORPUS], guild_id=1)
        for mode in MODES:
            recalls, rrs = [], []
            for q in queries:
                result = await search_knowledge(
                    db, embedder, q["query"], guild_id=1, mode=mode, top_k=4 * K
                )
                files = _files([h.hit.source_uri for h in result.hits])[:K]
                relevant = set(q["relevant"])
                recalls.append(len(relevant & set(files)) / len(relevant))
                rank = next((i for i, f in enumerate(files, 1) if f in relevant), None)
                rrs.append(0.0 if rank is None else 1.0 / rank)
            out[mode] = Quality(sum(recalls) / len(recalls), sum(rrs) / len(rrs))
    return out


async def ingest_rate(embedder: EmbeddingProvider, url: str, copies: int) -> tuple[int, float]:
    """Chunks/s for ingesting the corpus ``copies`` times under different guilds."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    async with open_database(url, settings=settings) as db:
        start = time.perf_counter()
        chunks = 0
        for g in range(copies):
            report = await ingest_paths(db, embedder, [CORPUS], guild_id=100 + g)
            chunks += report.chunks
        return chunks, time.perf_counter() - start


def embedders() -> list[tuple[str, EmbeddingProvider]]:
    found: list[tuple[str, EmbeddingProvider]] = [("hashing", HashingEmbeddingProvider())]
    try:
        from kotonoha_bot.knowledge.embeddings.local import LocalEmbeddingProvider

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        found.append(("local", LocalEmbeddingProvider()))  # type: ignore[call-arg]
    except Exception as exc:  # the [local] extra is optional
        print(f"(local embedder skipped: {type(exc).__name__}: {exc})")
    if os.environ.get("OPENAI_API_KEY"):
        from kotonoha_bot.knowledge.embeddings import create_embedding_provider

        found.append(
            ("openai", create_embedding_provider(Settings(embedding_provider="openai")))  # type: ignore[call-arg]
        )
    return found


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kotonoha-retrieval-"))
    n = 0

    async def url() -> str:
        nonlocal n
        n += 1
        return f"sqlite:///{tmp / f'r{n}.db'}"

    print(f"corpus: {CORPUS.relative_to(ROOT)}, queries: {QUERIES.relative_to(ROOT)}, k={K}\n")
    print(f"| embedder | mode | recall@{K} | MRR |")
    print("|---|---|---|---|")
    for name, emb in embedders():
        quality = await evaluate(emb, await url())
        for mode in MODES:
            q = quality[mode]
            print(f"| {name} | {mode} | {q.recall:.3f} | {q.mrr:.3f} |")
        await emb.aclose()

    print("\n| ingest | chunks | seconds | chunks/s |")
    print("|---|---|---|---|")
    chunks, secs = await ingest_rate(HashingEmbeddingProvider(), await url(), args.copies)
    print(f"| hashing (512 dims) | {chunks} | {secs:.2f} | {chunks / secs:.0f} |")
    from tests.fakes.api_server import FakeAPIServer

    from kotonoha_bot.knowledge.embeddings.openai_api import OpenAIEmbeddingProvider

    async with FakeAPIServer(embedding_dimension=1536) as server:
        emb = OpenAIEmbeddingProvider(
            api_key="sk-bench", base_url=server.openai_base_url, dimension=1536
        )
        chunks, secs = await ingest_rate(emb, await url(), args.copies)
        await emb.aclose()
        calls = len(server.requests_for("embeddings"))
    print(
        f"| openai client -> fake server on loopback (1536 dims, {calls} requests)"
        f" | {chunks} | {secs:.2f} | {chunks / secs:.0f} |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=5, help="corpus copies for throughput")
    asyncio.run(main(parser.parse_args()))
