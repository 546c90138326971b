"""Ingest text, Markdown and PDF files into one guild's knowledge base.

Which files, how they are decoded and streamed is :mod:`kotonoha_bot.knowledge.files`
(stay inside the given folders, detect encodings, refuse binary, bounded memory);
PDF text comes from :mod:`kotonoha_bot.knowledge.pdf`. :func:`ingest_bytes` takes a
file's bytes that arrived another way (``/kb add`` on Discord) through the same rules
as a file on disk. Every problem is reported per file and the other files go on. A file is
NUL-cleaned (the NUL rule in ``kotonoha_bot.text``), normalised and hashed.
Unchanged content (same hash, already embedded) is skipped without calling the
embedder. A file of one segment replaces its old chunks in one transaction; a
larger file is written segment by segment (``save_source`` then ``add_chunks``, each
a short transaction, so another writer is never locked out for the whole file) and
gets its content hash only after the last segment (``set_source_hash``), so an
interrupted ingest is redone on the next run, never taken as unchanged. When the
embedder fails, the chunks are stored anyway without vectors (the source stays
``pending``) so no work is lost; :func:`embed_pending` finishes them later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kotonoha_bot.db.checks import check_ids
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import EmbeddingError, InvalidInputError
from kotonoha_bot.knowledge.chunking import (
    Chunk,
    chunk_key,
    chunk_text,
    content_hash,
    normalize_for_storage,
)
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider, embedding_config
from kotonoha_bot.knowledge.files import (
    DOCUMENT_SUFFIXES,
    PDF_SUFFIXES,
    SEGMENT_CHARS,
    TEXT_SUFFIXES,
    Segment,
    Source,
    discover,
    display_path,
    open_text,
)
from kotonoha_bot.knowledge.pdf import pdf_text
from kotonoha_bot.models import KnowledgeChunk, KnowledgeSource, Vector
from kotonoha_bot.text import replace_nul

log = logging.getLogger("kotonoha_bot.knowledge")

__all__ = [
    "DOCUMENT_SUFFIXES",
    "PDF_SUFFIXES",
    "TEXT_SUFFIXES",
    "IngestReport",
    "find_files",
    "ingest_bytes",
    "ingest_paths",
    "ingest_text",
]

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
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "notes": [{"path": p, "note": n} for p, n in self.notes],
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
    """The files an ingest of ``paths`` reads (:func:`kotonoha_bot.knowledge.files.discover`)."""
    return discover(paths).files


def source_uri(path: Path) -> str:
    """A stable name for a file, always valid text (relative to the working directory if inside)."""
    return display_path(path)


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
    segment_chars: int = SEGMENT_CHARS,
) -> str:
    """Store one file's bytes by the rules of a file on disk (see :func:`ingest_text`)."""
    check_ids("ingest", guild_id, channel_id)
    return await _ingest_file(
        db,
        embedder,
        data,
        uri=uri,
        guild_id=guild_id,
        channel_id=channel_id,
        metadata=metadata,
        max_chars=max_chars,
        overlap_chars=overlap_chars,
        batch_size=batch_size,
        report=report if report is not None else IngestReport(),
        on_batch=on_batch,
        segment_chars=segment_chars,
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
    segment_chars: int = SEGMENT_CHARS,
) -> IngestReport:
    """Ingest files and folders; one bad file is reported and the rest go on."""
    check_ids("ingest", guild_id, channel_id)
    if embedder is not None:
        await db.set_embedding_config(embedding_config(embedder))
    report = IngestReport()
    found = discover(paths)
    report.skipped.extend(found.skipped)
    for path in found.files:
        uri = source_uri(path)
        if uri != os.fsdecode(path) and "\\x" in uri and "\\x" not in os.fsdecode(path):
            report.notes.append((uri, "the file name is not valid UTF-8; stored under this name"))
        try:
            await _ingest_file(
                db,
                embedder,
                path,
                uri=uri,
                guild_id=guild_id,
                channel_id=channel_id,
                metadata=None,
                max_chars=max_chars,
                overlap_chars=overlap_chars,
                batch_size=batch_size,
                report=report,
                on_batch=None,
                segment_chars=segment_chars,
            )
        except (OSError, InvalidInputError, UnicodeError) as exc:
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            elif isinstance(exc, UnicodeError):
                reason = f"cannot be decoded ({type(exc).__name__})"
            else:
                reason = str(exc)
            report.failed.append((uri, reason))
            log.warning("cannot ingest %s: %s", uri, reason)
        if on_file is not None:
            on_file(path)
    return report


async def _ingest_file(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    path: Source,
    *,
    uri: str,
    guild_id: int,
    channel_id: int | None,
    metadata: dict[str, Any] | None,
    max_chars: int,
    overlap_chars: int,
    batch_size: int,
    report: IngestReport,
    on_batch: BatchProgress | None,
    segment_chars: int,
) -> str:
    """One file (on disk or as bytes): a PDF by its text layer, text by the encoding rule."""
    metadata = {"path": uri, "kind": "document", **(metadata or {})}
    if Path(uri).suffix.lower() in PDF_SUFFIXES:
        data = path if isinstance(path, bytes) else path.read_bytes()
        return await ingest_text(
            db,
            embedder,
            uri=uri,
            text=pdf_text(data, uri),
            guild_id=guild_id,
            channel_id=channel_id,
            metadata=metadata,
            max_chars=max_chars,
            overlap_chars=overlap_chars,
            batch_size=batch_size,
            report=report,
            on_batch=on_batch,
        )
    stream = open_text(path, segment_chars=segment_chars)
    if stream.decoding.note:
        report.notes.append((uri, stream.decoding.note))
    if stream.decoding.errors != "strict":
        report.invalid_utf8_files.append(uri)
    segments = stream.segments()
    first = next(segments, None)
    second = next(segments, None)
    if second is None:  # the whole file is one segment: one transaction, as for any text
        report.nul_replaced += stream.nul_replaced
        return await ingest_text(
            db,
            embedder,
            uri=uri,
            text=first.text if first else "",
            guild_id=guild_id,
            channel_id=channel_id,
            metadata=metadata,
            max_chars=max_chars,
            overlap_chars=overlap_chars,
            batch_size=batch_size,
            report=report,
            on_batch=on_batch,
        )
    assert first is not None
    segments.close()
    return await _ingest_large(
        db,
        embedder,
        path,
        uri=uri,
        title=_title(first.text, Path(uri)),
        guild_id=guild_id,
        channel_id=channel_id,
        metadata=metadata,
        max_chars=max_chars,
        overlap_chars=overlap_chars,
        batch_size=batch_size,
        report=report,
        segment_chars=segment_chars,
    )


async def _ingest_large(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    path: Source,
    *,
    uri: str,
    title: str,
    guild_id: int,
    channel_id: int | None,
    metadata: dict[str, Any],
    max_chars: int,
    overlap_chars: int,
    batch_size: int,
    report: IngestReport,
    segment_chars: int,
) -> str:
    """A file of several segments, written one segment at a time (bounded memory)."""
    digest = open_text(path, segment_chars=segment_chars).digest()
    existing = await db.find_source(guild_id, uri)
    if existing is not None and existing.content_hash == digest and existing.status == "ready":
        report.unchanged.append(uri)
        return "unchanged"
    stream = open_text(path, segment_chars=segment_chars)
    # No hash until the last segment is stored: an interrupted run is redone next time.
    source = KnowledgeSource(
        guild_id=guild_id,
        channel_id=channel_id,
        uri=uri,
        title=title,
        content_hash="",
        metadata=dict(metadata),
    )
    source_id: int | None = None
    seen: dict[bytes, int] = {}
    index = 0
    pending = False
    for segment in stream.segments():
        chunks = chunk_text(
            segment.text, max_chars=max_chars, overlap_chars=overlap_chars, id_prefix=uri
        )
        rows = _segment_rows(chunks, segment, uri, index, seen)
        index += len(rows)
        vectors = await _embed_or_none(embedder, [r.content for r in rows], batch_size, uri)
        if vectors is None:
            pending = True
        else:
            rows = [dataclasses.replace(r, embedding=vectors[i]) for i, r in enumerate(rows)]
        if source_id is None:
            saved = await db.save_source(source, rows)
            assert saved.source_id is not None
            source_id = saved.source_id
        else:
            await db.add_chunks(source_id, rows)
        report.chunks += len(rows)
        if vectors is not None:
            report.embedded_chunks += len(rows)
    report.nul_replaced += stream.nul_replaced
    assert source_id is not None
    await db.set_source_hash(source_id, digest)
    if pending:
        report.pending.append(uri)
        return "pending"
    (report.added if existing is None else report.updated).append(uri)
    return "added" if existing is None else "updated"


def _segment_rows(
    chunks: Sequence[Chunk], segment: Segment, uri: str, first_index: int, seen: dict[bytes, int]
) -> list[KnowledgeChunk]:
    """Chunks of one segment as rows keyed, numbered and located within the whole file."""
    rows = []
    for i, c in enumerate(chunks):
        h = hashlib.sha256(c.content.encode("utf-8")).digest()
        occurrence = seen.get(h, 0)
        seen[h] = occurrence + 1
        meta = c.metadata()
        meta["start"] = c.start + segment.offset
        meta["end"] = c.end + segment.offset
        if "heading" not in meta and segment.heading:
            meta["heading"] = " > ".join(segment.heading)
        rows.append(
            KnowledgeChunk(
                chunk_key=chunk_key(uri, c.content, occurrence),
                content=c.content,
                chunk_index=first_index + i,
                embedding=None,
                metadata=meta,
            )
        )
    return rows


async def _embed_or_none(
    embedder: EmbeddingProvider | None, texts: Sequence[str], batch_size: int, uri: str
) -> list[Vector] | None:
    if embedder is None or not texts:
        return None
    try:
        return await embed_texts(embedder, texts, batch_size)
    except EmbeddingError as exc:
        log.warning("embedding %s failed, stored as pending: %s", uri, exc)
        return None


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
