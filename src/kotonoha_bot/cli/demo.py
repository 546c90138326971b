"""`kotonoha demo`: the main job on the embedded default, in one command.

Builds a knowledge base on SQLite from the sample corpus under ``examples/`` and
prints hybrid search results for the sample questions. Needs no key and no server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kotonoha_bot.cli.common import err_console, fail, get_settings, out_console, run_async
from kotonoha_bot.cli.kb import _open, _print_hits, _progress
from kotonoha_bot.knowledge.ingest import find_files, ingest_paths
from kotonoha_bot.knowledge.search import search_knowledge, search_tuning

DEMO_GUILD = 1


@run_async
async def demo(
    corpus: Annotated[
        Path, typer.Option("--corpus", help="Folder of .md/.txt files to ingest.")
    ] = Path("examples/corpus"),
    questions: Annotated[Path, typer.Option("--questions", help="One question per line.")] = Path(
        "examples/demo-questions.txt"
    ),
    database: Annotated[
        str, typer.Option("--database", "-d", help="Where to build the demo knowledge base.")
    ] = "sqlite:///data/demo.db",
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=20)] = 3,
) -> None:
    """Build a knowledge base from the sample corpus and answer sample questions.

    Runs on SQLite with the offline hashing embedder unless OPENAI_API_KEY or
    EMBEDDING_PROVIDER says otherwise. Running it again skips unchanged files.

    Example: kotonoha demo
    """
    if not corpus.is_dir():
        raise fail(f"{corpus}: corpus folder not found (run from the repository root)", 2)
    settings = get_settings()
    asked = [q.strip() for q in questions.read_text("utf-8").splitlines() if q.strip()]
    files = find_files([corpus])
    async with _open(settings, database) as (db, embedder):
        err_console.print(
            f"knowledge base: {db.location}  embedder: {embedder.name} ({embedder.model},"
            f" {embedder.dimension} dims)"
        )
        with _progress() as progress:
            task = progress.add_task("ingesting", total=len(files))
            report = await ingest_paths(
                db,
                embedder,
                [corpus],
                guild_id=DEMO_GUILD,
                max_chars=settings.chunk_max_chars,
                overlap_chars=settings.chunk_overlap_chars,
                batch_size=settings.embedding_batch_size,
                on_file=lambda _p: progress.advance(task),
            )
        err_console.print(
            f"{len(report.added)} added, {len(report.updated)} updated,"
            f" {len(report.unchanged)} unchanged, {report.chunks} chunks written"
        )
        for question in asked:
            result = await search_knowledge(
                db,
                embedder,
                question,
                guild_id=DEMO_GUILD,
                mode="hybrid",
                top_k=top_k,
                **search_tuning(settings),
            )
            _print_hits(result, question)
    out_console.print(
        'Try your own: kotonoha kb search "..." --guild 1 --database sqlite:///data/demo.db'
    )
