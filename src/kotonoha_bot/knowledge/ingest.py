"""Ingest text, Markdown and PDF files into one guild's knowledge base.

:func:`ingest_bytes` is the one entry point for a file's content, whether it comes
from disk (``kotonoha kb ingest``) or from a Discord attachment (``/kb add``), so both
follow the same rules. A file is decoded (UTF-8 with a BOM allowed, invalid bytes
replaced and reported; PDF through :mod:`kotonoha_bot.knowledge.pdf`), NUL-cleaned
(the NUL rule in ``kotonoha_bot.text``), normalised and hashed. Unchanged content
(same hash, already embedded) is skipped without calling the embedder. Changed content
replaces the old chunks in one transaction. When the embedder fails, the chunks are
stored anyway without vectors (the source stays ``pending``) so no work is lost;
:func:`embed_pending` finishes them later.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kotonoha_bot.db.base import DatabaseProtocol
from kotonoha_bot.errors import EmbeddingError, InvalidInputError
from kotonoha_bot.knowledge.chunking import chunk_text, content_hash, normalize_for_storage
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider, embedding_config
from kotonoha_bot.models import KnowledgeChunk, KnowledgeSource, Vector
from kotonoha_bot.text import replace_nul

log = logging.getLogger("kotonoha_bot.knowledge")

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".text", ".rst"})
PDF_SUFFIXES = frozenset({".pdf"})
DOCUMENT_SUFFIXES = TEXT_SUFFIXES | PDF_SUFFIXES

Progress = Callable[[int], None]
#: Called after each embedded batch with (chunks embedded so far, chunks in total).
BatchProgress = Callable[[int, int], Awaitable[None]]


@dataclass
class IngestReport:
    """What one ingest run did, file by file."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0
    embedded_chunks: int = 0
    nul_replaced: int = 0
    invalid_utf8_files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "pending": self.pending,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "chunks": self.chunks,
            "embedded_chunks": self.embedded_chunks,
            "nul_replaced": self.nul_replaced,
            "invalid_utf8_files": self.invalid_utf8_files,
        }


def find_files(paths: Iterable[Path]) -> list[Path]:
    """Text/Markdown/PDF files under ``paths`` (folders recursively, hidden entries skipped)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES:
                    found.append(p)
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidInputError(f"{path}: no such file or directory")
    return found


def source_uri(path: Path) -> str:
    """A stable name for a file: relative to the working directory when inside it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def _title(text: str, path: Path) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip() or path.stem
        if stripped:
            break
    return path.stem


async def embed_texts(
    embedder: EmbeddingProvider,
    texts: Sequence[str],
    batch_size: int,
    on_batch: BatchProgress | None = None,
) -> list[Vector]:
    """Embed in batches (the provider may batch further)."""
    vectors: list[Vector] = []
    for start in range(0, len(texts), batch_size):
        batch = await embedder.embed(list(texts[start : start + batch_size]))
        vectors.extend(batch[i] for i in range(batch.shape[0]))
        if on_batch is not None:
            await on_batch(len(vectors), len(texts))
    return vectors


def decode_document(name: str, data: bytes, report: IngestReport) -> str:
    """A file's text: PDF by its text layer, anything else as UTF-8 (bad bytes replaced)."""
    if Path(name).suffix.lower() in PDF_SUFFIXES:
        from kotonoha_bot.knowledge.pdf import pdf_text

        return pdf_text(data, name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        report.invalid_utf8_files.append(name)
        return data.decode("utf-8", errors="replace")


async def ingest_bytes(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    *,
    uri: str,
    data: bytes,
    guild_id: int,
    channel_id: int | None = None,
    metadata: dict[str, Any] | None = None,
    max_chars: int = 800,
    overlap_chars: int = 100,
    batch_size: int = 64,
    report: IngestReport | None = None,
    on_batch: BatchProgress | None = None,
) -> str:
    """Decode one file's bytes and store it (see :func:`ingest_text` for the outcome)."""
    report = report if report is not None else IngestReport()
    text = decode_document(uri, data, report)
    return await ingest_text(
        db,
        embedder,
        uri=uri,
        text=text,
        guild_id=guild_id,
        channel_id=channel_id,
        metadata=metadata,
        max_chars=max_chars,
        overlap_chars=overlap_chars,
        batch_size=batch_size,
        report=report,
        on_batch=on_batch,
    )


async def ingest_text(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    *,
    uri: str,
    text: str,
    guild_id: int,
    channel_id: int | None = None,
    title: str | None = None,
    metadata: dict[str, Any] | None = None,
    max_chars: int = 800,
    overlap_chars: int = 100,
    batch_size: int = 64,
    report: IngestReport | None = None,
    on_batch: BatchProgress | None = None,
) -> str:
    """Store one document; returns 'added', 'updated', 'unchanged' or 'pending'."""
    report = report if report is not None else IngestReport()
    text, nul = replace_nul(text)
    report.nul_replaced += nul
    normalized = normalize_for_storage(text)
    digest = content_hash(normalized)
    existing = await db.find_source(guild_id, uri)
    if existing is not None and existing.content_hash == digest and existing.status == "ready":
        report.unchanged.append(uri)
        return "unchanged"
    chunks = chunk_text(normalized, max_chars=max_chars, overlap_chars=overlap_chars, id_prefix=uri)
    vectors: list[Vector] | None = None
    if embedder is not None and chunks:
        try:
            vectors = await embed_texts(embedder, [c.content for c in chunks], batch_size, on_batch)
        except EmbeddingError as exc:
            log.warning("embedding %s failed, stored as pending: %s", uri, exc)
    rows = [
        KnowledgeChunk(
            chunk_key=c.chunk_key,
            content=c.content,
            chunk_index=c.index,
            embedding=None if vectors is None else vectors[i],
            metadata=c.metadata(),
        )
        for i, c in enumerate(chunks)
    ]
    source = KnowledgeSource(
        guild_id=guild_id,
        channel_id=channel_id,
        uri=uri,
        title=title or _title(normalized, Path(uri)),
        content_hash=digest,
        metadata=dict(metadata or {}),
    )
    await db.save_source(source, rows)
    report.chunks += len(rows)
    if vectors is None and rows:
        report.pending.append(uri)
        return "pending"
    report.embedded_chunks += len(rows)
    outcome = "added" if existing is None else "updated"
    (report.added if existing is None else report.updated).append(uri)
    return outcome


async def ingest_paths(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    paths: Sequence[Path],
    *,
    guild_id: int,
    channel_id: int | None = None,
    max_chars: int = 800,
    overlap_chars: int = 100,
    batch_size: int = 64,
    on_file: Callable[[Path], None] | None = None,
) -> IngestReport:
    """Ingest files and folders; one bad file is reported and the rest go on."""
    if embedder is not None:
        await db.set_embedding_config(embedding_config(embedder))
    report = IngestReport()
    for path in find_files(paths):
        uri = source_uri(path)
        try:
            await ingest_bytes(
                db,
                embedder,
                uri=uri,
                data=path.read_bytes(),
                guild_id=guild_id,
                channel_id=channel_id,
                metadata={"path": uri, "kind": "document"},
                max_chars=max_chars,
                overlap_chars=overlap_chars,
                batch_size=batch_size,
                report=report,
            )
        except (OSError, InvalidInputError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            report.failed.append((uri, reason))
            log.warning("cannot ingest %s: %s", uri, reason)
        if on_file is not None:
            on_file(path)
    return report


async def embed_pending(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider,
    *,
    batch_size: int = 64,
    on_batch: Progress | None = None,
    max_batches: int | None = None,
) -> int:
    """Embed chunks stored without vectors; returns how many were embedded."""
    await db.set_embedding_config(embedding_config(embedder))
    done = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        todo = await db.pending_chunks(batch_size)
        if not todo:
            break
        vectors = await embedder.embed([p.content for p in todo])
        done += await db.set_chunk_embeddings(
            [(p.chunk_id, vectors[i]) for i, p in enumerate(todo)]
        )
        batches += 1
        if on_batch is not None:
            on_batch(len(todo))
    return done


async def reembed(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider,
    *,
    batch_size: int = 64,
    on_batch: Progress | None = None,
) -> int:
    """Rebuild every vector with ``embedder``'s model (resumable), then switch over.

    Until the switch, searches keep using the old vectors; an interrupted run
    resumes where it stopped because staged vectors are kept.
    """
    target = embedding_config(embedder)
    if await db.get_embedding_config() is None:
        await db.set_embedding_config(target)
        return 0
    await db.begin_reembed(target)
    done = 0
    while todo := await db.reembed_todo(batch_size):
        vectors = await embedder.embed([p.content for p in todo])
        done += await db.store_reembed([(p.chunk_id, vectors[i]) for i, p in enumerate(todo)])
        if on_batch is not None:
            on_batch(len(todo))
    await db.finish_reembed()
    return done


def normalized_length(text: str) -> int:
    """Characters after normalisation (for progress estimates)."""
    return len(normalize_for_storage(text))
