"""`kotonoha kb ...`: build and search the knowledge base."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kotonoha_bot.cli.common import (
    DatabaseOption,
    JsonOption,
    database_url,
    err_console,
    fail,
    get_settings,
    out_console,
    print_json,
    run_async,
)
from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.knowledge.archive import archive_idle_sessions
from kotonoha_bot.knowledge.embeddings import EmbeddingProvider, create_embedding_provider
from kotonoha_bot.knowledge.ingest import embed_pending, find_files, ingest_paths, reembed
from kotonoha_bot.knowledge.search import (
    SEARCH_MODES,
    SearchResult,
    SearchTuning,
    search_knowledge,
)

app = typer.Typer(help="Build and search the knowledge base.", no_args_is_help=True)

GuildOption = Annotated[int, typer.Option("--guild", "-g", help="Discord guild (server) id.")]
ChannelOption = Annotated[
    int | None, typer.Option("--channel", "-c", help="Limit to one channel id.")
]


def progress_bar() -> Progress:
    """The progress bar every long knowledge command shows on stderr."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


@asynccontextmanager
async def open_knowledge(
    settings: Settings, database: str | None, *, target: bool = False
) -> AsyncIterator[tuple[DatabaseProtocol, EmbeddingProvider]]:
    """The database and its embedder: the recorded model, or (``target``) the configured one."""
    async with open_database(database_url(settings, database), settings=settings) as db:
        recorded = None if target else await db.get_embedding_config()
        embedder = create_embedding_provider(settings, recorded=recorded)
        try:
            yield db, embedder
        finally:
            await embedder.aclose()


@app.command("ingest")
@run_async
async def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (.md, .txt, .pdf).")],
    guild: GuildOption,
    channel: ChannelOption = None,
    database: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add text, Markdown and PDF files to a guild's knowledge base.

    Unchanged files are skipped; changed files replace their old chunks. If the
    embedding service fails, chunks are kept as pending: run `kb embed-pending` later.

    Example: kotonoha kb ingest examples/corpus --guild 1
    """
    settings = get_settings()
    files = find_files(paths)  # for the progress bar; ingest reports what it skipped
    async with open_knowledge(settings, database) as (db, embedder):
        with progress_bar() as progress:
            task = progress.add_task("ingesting", total=len(files))
            report = await ingest_paths(
                db,
                embedder,
                paths,
                guild_id=guild,
                channel_id=channel,
                max_chars=settings.chunk_max_chars,
                overlap_chars=settings.chunk_overlap_chars,
                batch_size=settings.embedding_batch_size,
                on_file=lambda _p: progress.advance(task),
            )
    if as_json:
        print_json(report.as_dict())
    else:
        table = Table(title=f"ingest into guild {guild}", show_header=True)
        table.add_column("result")
        table.add_column("files", justify="right")
        for name, items in (
            ("added", report.added),
            ("updated", report.updated),
            ("unchanged (skipped)", report.unchanged),
            ("pending embedding", report.pending),
        ):
            table.add_row(name, str(len(items)))
        table.add_row("failed", str(len(report.failed)))
        table.add_row("skipped (not read)", str(len(report.skipped)))
        table.add_row("chunks written", str(report.chunks))
        err_console.print(table)
        for path, reason in report.failed:
            err_console.print(f"[red]failed[/] {escape(path)}: {escape(reason)}", soft_wrap=True)
        for path, reason in report.skipped:
            err_console.print(
                f"[yellow]skipped[/] {escape(path)}: {escape(reason)}", soft_wrap=True
            )
        for path, note in report.notes:
            err_console.print(f"note {escape(path)}: {escape(note)}", soft_wrap=True)
        if report.nul_replaced:
            err_console.print(f"replaced {report.nul_replaced} NUL characters with U+FFFD")
        if report.pending:
            err_console.print(
                "[yellow]some files await embeddings;[/] run `kotonoha kb embed-pending`"
            )
    if report.failed:
        raise typer.Exit(1)


def print_hits(result: SearchResult, query: str) -> None:
    """A search result as a table on stdout, or why nothing was found."""
    if not result.hits:
        out_console.print(f"no results for {query!r}")
        if result.dropped and result.floor is not None:
            f = result.floor
            out_console.print(
                f"[dim]the relevance floor dropped {len(result.dropped)} weak hits (best"
                f" similarity {_num(f.best_similarity)} < {_num(f.min_similarity)}, best"
                f" keyword coverage {_num(f.best_coverage)} < {_num(f.min_coverage)});"
                " --json lists them[/]"
            )
        return
    table = Table(title=f"{result.mode} search: {query}", show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("source")
    table.add_column("snippet")
    for i, r in enumerate(result.hits, 1):
        h = r.hit
        where = h.source_title or h.source_uri
        location = h.metadata.get("heading")
        source = f"{where}\n[dim]{h.source_uri}[/]" + (
            f"\n[dim]§ {location}[/]" if location else ""
        )
        snippet = h.content.replace("\n", " ")
        snippet = snippet if len(snippet) <= 160 else snippet[:157] + "..."
        table.add_row(str(i), f"{r.score:.4f}", source, snippet)
    out_console.print(table)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


@app.command("search")
@run_async
async def search(
    query: Annotated[str, typer.Argument(help="What to look for (Japanese or English).")],
    guild: GuildOption,
    channel: ChannelOption = None,
    mode: Annotated[
        str, typer.Option("--mode", "-m", help="hybrid, vector or keyword.")
    ] = "hybrid",
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=100)] = 5,
    database: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Search a guild's knowledge base.

    Example: kotonoha kb search "次の会議はいつ？" --guild 1 --mode hybrid
    """
    if mode not in SEARCH_MODES:
        raise fail(f"--mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}", 2)
    settings = get_settings()
    async with open_knowledge(settings, database) as (db, embedder):
        await _check_model(db, embedder)
        result = await search_knowledge(
            db,
            embedder,
            query,
            guild_id=guild,
            channel_id=channel,
            mode=mode,
            top_k=top_k,
            tuning=SearchTuning.from_settings(settings),
        )
        # Provenance: a conversation hit links to its first message on Discord.
        origins = await db.chunk_origins([r.hit.chunk_id for r in result.hits])
    links = {cid: o.first_link.url for cid, o in origins.items() if o.first_link is not None}
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    if as_json:
        print_json(
            {
                "query": query,
                "mode": mode,
                "guild_id": guild,
                "channel_id": channel,
                "hits": [{**r.as_dict(), "link": links.get(r.hit.chunk_id)} for r in result.hits],
                "warnings": result.warnings,
                "floor": None if result.floor is None else result.floor.as_dict(),
                "dropped": [r.as_dict() for r in result.dropped],
            }
        )
    else:
        print_hits(result, query)


async def _check_model(db: DatabaseProtocol, embedder: EmbeddingProvider) -> None:
    """Refuse to mix vectors of two models (the database names both)."""
    from kotonoha_bot.db.checks import check_embedding_config
    from kotonoha_bot.knowledge.embeddings import embedding_config

    check_embedding_config(await db.get_embedding_config(), embedding_config(embedder))


@app.command("embed-pending")
@run_async
async def embed_pending_cmd(
    database: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Embed chunks stored without vectors (after an embedding-service failure).

    Example: kotonoha kb embed-pending
    """
    settings = get_settings()
    async with open_knowledge(settings, database) as (db, embedder):
        total = (await db.stats()).pending_chunks
        with progress_bar() as progress:
            task = progress.add_task("embedding", total=total)
            done = await embed_pending(
                db,
                embedder,
                batch_size=settings.embedding_batch_size,
                on_batch=lambda n: progress.advance(task, n),
            )
        left = (await db.stats()).pending_chunks
    if as_json:
        print_json({"embedded": done, "pending": left})
    else:
        err_console.print(f"embedded {done} chunks; {left} still pending")


@app.command("reembed")
@run_async
async def reembed_cmd(
    database: DatabaseOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Rebuild every vector with the configured embedding model, then switch.

    Searches keep using the old vectors until every chunk has a new one; an
    interrupted run resumes where it stopped.

    Example: EMBEDDING_PROVIDER=openai kotonoha kb reembed --yes
    """
    settings = get_settings()
    async with open_knowledge(settings, database, target=True) as (db, embedder):
        current = await db.get_embedding_config()
        target = f"{embedder.model} ({embedder.dimension} dims)"
        if current is not None and (current.model, current.dimension) == (
            embedder.model,
            embedder.dimension,
        ):
            err_console.print(f"already using {target}; nothing to do")
            return
        stats = await db.stats()
        if not yes and current is not None:
            typer.confirm(
                f"re-embed {stats.chunks} chunks from {current.model} ({current.dimension} dims)"
                f" to {target}?",
                abort=True,
                err=True,
            )
        with progress_bar() as progress:
            task = progress.add_task("re-embedding", total=stats.chunks)
            status = await db.reembed_status()
            if status is not None and (status.target.model, status.target.dimension) == (
                embedder.model,
                embedder.dimension,
            ):
                progress.advance(task, status.done)
            done = await reembed(
                db,
                embedder,
                batch_size=settings.embedding_batch_size,
                on_batch=lambda n: progress.advance(task, n),
            )
    err_console.print(f"re-embedded {done} chunks; the database now uses {target}")


@app.command("archive")
@run_async
async def archive_cmd(
    database: DatabaseOption = None,
    idle_minutes: Annotated[
        float | None,
        typer.Option("--idle-minutes", help="Override ARCHIVE_IDLE_MINUTES."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Turn idle conversations into knowledge (the bot also does this by itself).

    Example: kotonoha kb archive --idle-minutes 0
    """
    settings = get_settings()
    async with open_knowledge(settings, database) as (db, embedder):
        report = await archive_idle_sessions(
            db,
            embedder,
            idle_minutes=settings.archive_idle_minutes if idle_minutes is None else idle_minutes,
            window=settings.archive_window_messages,
            overlap=settings.archive_window_overlap,
        )
    if as_json:
        print_json(
            {
                "sessions": report.sessions,
                "chunks_added": report.chunks_added,
                "skipped_dm": report.skipped_dm,
            }
        )
    else:
        err_console.print(
            f"archived {len(report.sessions)} sessions into {report.chunks_added} chunks"
            f" ({report.skipped_dm} DM sessions are never archived)"
        )
