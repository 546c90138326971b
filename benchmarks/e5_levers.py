"""What the chunker and the passage text do to e5's paraphrase and cross-lingual recall.

    .venv/bin/python -m benchmarks.e5_levers [--configs 800:100,600:80,400:50,250:40]

The goal for the offline default (e5) is paraphrase and cross-lingual recall@5 >= 0.85.
This measures the levers on the passage side, each on a fresh SQLite database built
through the real ingest and archiving code, and prints vector and hybrid (the shipped
profile, no relevance floor) recall@5 / MRR per class on the dev half (where a
choice would be made) and the test half:

* the chunk size and overlap (``CHUNK_MAX_CHARS`` / ``CHUNK_OVERLAP_CHARS``);
* ``+heading``: each corpus chunk embedded with the path of headings above it (the
  document title and parent sections a short chunk lacks), the stored text
  unchanged;
* the longest chunk in e5 tokens (multilingual-e5-small reads at most 512; a longer
  chunk would be cut).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench_retrieval import CLASSES, CONVERSATIONS, CORPUS, QUERIES
from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.knowledge.chunking import chunk_text, normalize_for_storage
from kotonoha_bot.knowledge.embeddings.base import Vectors
from kotonoha_bot.knowledge.embeddings.e5 import E5EmbeddingProvider
from kotonoha_bot.knowledge.evaluation import build_example_knowledge, evaluate, load_queries


class HeadingE5(E5EmbeddingProvider):
    """e5 that embeds a known corpus chunk as "heading path" + chunk (stored text as is)."""

    def __init__(self, context: dict[str, str]) -> None:
        super().__init__()
        self.context = context

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return await super().embed([self.context.get(t, t) for t in texts])


def heading_context(max_chars: int, overlap: int) -> tuple[dict[str, str], int]:
    """Chunk text -> heading path + text, and the longest chunk in e5 tokens."""
    from kotonoha_bot.knowledge.embeddings.e5 import _shared_model

    engine = _shared_model(0)
    context: dict[str, str] = {}
    longest = 0
    for f in sorted(CORPUS.rglob("*.md")):
        norm = normalize_for_storage(f.read_text(encoding="utf-8"))
        for c in chunk_text(norm, max_chars=max_chars, overlap_chars=overlap):
            longest = max(longest, int(engine.token_count(c.content)))
            heads = list(c.heading)
            first = c.content.split("\n", 1)[0].lstrip("#").strip()
            if heads and first == heads[-1]:
                heads = heads[:-1]  # the chunk starts with its own heading
            if heads:
                context[c.content] = " > ".join(heads) + "\n" + c.content
    return context, longest


async def main(args: argparse.Namespace) -> None:
    queries = load_queries(QUERIES)
    tmp = Path(tempfile.mkdtemp(prefix="kotonoha-e5-levers-"))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    print(
        "| chunk chars / overlap | passage | longest chunk (tokens) | split | class"
        " | vector R@5 / MRR | hybrid R@5 / MRR |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec in args.configs.split(","):
        max_chars, overlap = (int(x) for x in spec.split(":"))
        context, longest = heading_context(max_chars, overlap)
        for label, emb in (("chunk", E5EmbeddingProvider()), ("+heading", HeadingE5(context))):
            path = tmp / f"e5-{max_chars}-{overlap}-{label}.db"
            async with open_database(f"sqlite:///{path}", settings=settings) as db:
                await build_example_knowledge(
                    db, emb, CORPUS, CONVERSATIONS, max_chars=max_chars, overlap_chars=overlap
                )
                for split in ("dev", "test"):
                    ev = await evaluate(
                        db,
                        emb,
                        [q for q in queries if q.split == split],
                        modes=("vector", "hybrid"),
                    )
                    for cls in CLASSES:
                        if cls not in ("paraphrase", "crosslingual"):
                            continue
                        v, h = ev.scores["vector"][cls], ev.scores["hybrid_raw"][cls]
                        print(
                            f"| {max_chars} / {overlap} | {label} | {longest} | {split} | {cls}"
                            f" | {v.recall:.3f} / {v.mrr:.3f} | {h.recall:.3f} / {h.mrr:.3f} |"
                        )
            await emb.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="800:100,600:80,400:50,250:40")
    asyncio.run(main(parser.parse_args()))
