"""`kotonoha demo`: the main job on the embedded default, in one command.

Builds a knowledge base on SQLite from the sample corpus under ``examples/`` and
prints hybrid search results for the sample questions. Needs no key and no server.
The demo database is the demo's own: when it was built with another embedding model
than the one configured now (say hashing, before the e5 extra was installed), the
demo moves it with the same re-embedding ``kotonoha kb reembed`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kotonoha_bot.cli.common import (
    JsonOption,
    err_console,
    fail,
    get_settings,
    out_console,
    print_json,
    run_async,
)
from kotonoha_bot.cli.kb import open_knowledge, print_hits, progress_bar
from kotonoha_bot.knowledge.embeddings import embedding_config
from kotonoha_bot.knowledge.ingest import find_files, ingest_paths, reembed
from kotonoha_bot.knowledge.search import SearchTuning, search_knowledge

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
    as_json: JsonOption = False,
) -> None:
    """Build a knowledge base from the sample corpus and answer sample questions.

    Runs on SQLite with the offline e5 embedder (the hashing one without the [e5]
    extra) unless OPENAI_API_KEY or EMBEDDING_PROVIDER says otherwise. Running it
    again skips unchanged files.

    Example: kotonoha demo
    """
    if not corpus.is_dir():
        raise fail(f"{corpus}: corpus folder not found (run from the repository root)", 2)
    settings = get_settings()
    asked = [q.strip() for q in questions.read_text("utf-8").splitlines() if q.strip()]
    files = find_files([corpus])
    async with open_knowledge(settings, database, target=True) as (db, embedder):
        recorded = await db.get_embedding_config()
        if recorded is not None and recorded != embedding_config(embedder):
            err_console.print(
                f"the demo database was built with {recorded.model}; re-embedding it with"
                f" {embedder.model} (what `kotonoha kb reembed` does for yours)"
            )
            await reembed(db, embedder, batch_size=settings.embedding_batch_size)
        err_console.print(
            f"knowledge base: {db.location}  embedder: {embedder.name} ({embedder.model},"
            f" {embedder.dimension} dims)"
        )
        with progress_bar() as progress:
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
        answers = []
        for question in asked:
            result = await search_knowledge(
                db,
                embedder,
                question,
                guild_id=DEMO_GUILD,
                mode="hybrid",
                top_k=top_k,
                tuning=SearchTuning.from_settings(settings),
            )
            answers.append({"question": question, "hits": [h.as_dict() for h in result.hits]})
            if not as_json:
                print_hits(result, question)
    if as_json:
        print_json({"embedder": embedder.model, "answers": answers})
        return
    out_console.print(
        'Try your own: kotonoha kb search "..." --guild 1 --database sqlite:///data/demo.db'
    )
