"""Prove a copy exact: every row of the target against the source converted by the same rules.

:func:`compare` reads both sides in key order (the large tables as merged streams, the
small ones whole), converts each row with :class:`~kotonoha_bot.transfer.rowconv.RowConverter`
and compares checksums, then values column by column where they differ, embeddings
bit for bit; rows the conversion rejects (they would be quarantined) are expected to be
absent. :func:`verify` is ``kotonoha db verify``; :func:`table_checksums` writes the
per-table checksums of a backup manifest by the same fold.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, tzinfo
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db.tables import (
    CHUNK_MESSAGES,
    CHUNKS,
    MEMORIES,
    MESSAGE_REFS,
    MESSAGES,
    META,
    REEMBED,
    SESSIONS,
    SOURCES,
    TABLES,
    USAGE,
    Row,
    TableSpec,
)
from kotonoha_bot.errors import ConfigError
from kotonoha_bot.transfer.common import (
    DEFAULT_BATCH,
    DEFAULT_MAX_DIFFS,
    embedding_from_meta,
    key_text,
    prefetch,
    resolve_timezone,
)
from kotonoha_bot.transfer.endpoints import RowStore, display_url, endpoint_for, identity
from kotonoha_bot.transfer.marker import MIGRATION_MARKER, UNMOVED_META_KEYS
from kotonoha_bot.transfer.quarantine import Quarantine
from kotonoha_bot.transfer.reports import TableDiff, TransferProgress, VerifyReport
from kotonoha_bot.transfer.rowconv import Reject, RowConverter, comparable, jsonable, row_digest

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings


class Side:
    """One side of a comparison: its converter and what it saw."""

    def __init__(self, store: RowStore, timezone: tzinfo, dims: tuple[int | None, int | None]):
        self.store = store
        self.conv = RowConverter(timezone=timezone, embedding_dim=dims[0], reembed_dim=dims[1])
        self.chunk_ids: set[int] = set()
        self.message_ids: set[int] = set()
        self.conv.chunk_exists = self.chunk_ids.__contains__
        self.conv.message_exists = self.message_ids.__contains__

    def convert(self, spec: TableSpec, raw: Sequence[Any]) -> tuple[Row | None, str | None]:
        try:
            return self.conv.convert(spec, raw), None
        except Reject as exc:
            return None, str(exc)


async def read_dims(store: RowStore) -> tuple[dict[str, str], tuple[int | None, int | None]]:
    meta: dict[str, str] = {}
    for r in await store.read_all(META):
        if r[0] is not None and r[1] is not None:
            meta[str(key_text(r[0]))] = str(key_text(r[1]))
    emb = embedding_from_meta(meta, "embedding")
    ree = embedding_from_meta(meta, "reembed")
    return meta, (emb.dimension if emb else None, ree.dimension if ree else None)


class TableCompare:
    def __init__(self, spec: TableSpec, max_diffs: int) -> None:
        self.spec = spec
        self.diff = TableDiff(spec.name)
        self.max = max_diffs
        self.h_expected = hashlib.blake2b(digest_size=16)
        self.h_target = hashlib.blake2b(digest_size=16)

    def expected_only(self, key: Any) -> None:
        self.diff.missing_count += 1
        if len(self.diff.missing) < self.max:
            self.diff.missing.append(jsonable(key))

    def target_only(self, key: Any) -> None:
        self.diff.extra_count += 1
        if len(self.diff.extra) < self.max:
            self.diff.extra.append(jsonable(key))

    def invalid(self, key: Any, reason: str) -> None:
        self.diff.invalid_count += 1
        if len(self.diff.invalid) < self.max:
            self.diff.invalid.append({"key": jsonable(key), "reason": reason})

    def both(self, key: Any, expected: tuple[Any, ...], actual: tuple[Any, ...]) -> None:
        de, da = row_digest(expected), row_digest(actual)
        self.h_expected.update(repr(key).encode() + de)
        self.h_target.update(repr(key).encode() + da)
        if self.spec.name in (CHUNKS.name, REEMBED.name):
            idx = self.spec.names.index("embedding")
            if expected[idx] is not None and actual[idx] is not None:
                self.diff.vectors_compared += 1
        if de == da:
            self.diff.matching += 1
            return
        self.diff.differing_count += 1
        if len(self.diff.differing) < self.max:
            columns = [
                n for n, a, b in zip(self.spec.names, expected, actual, strict=True) if a != b
            ]
            self.diff.differing.append({"key": jsonable(key), "columns": columns})

    def finish(self) -> TableDiff:
        self.diff.expected_checksum = self.h_expected.hexdigest()
        self.diff.target_checksum = self.h_target.hexdigest()
        return self.diff


async def compare(
    expected: RowStore,
    actual: RowStore,
    *,
    timezone: tzinfo,
    batch_size: int = DEFAULT_BATCH,
    max_diffs: int = DEFAULT_MAX_DIFFS,
    progress: TransferProgress | None = None,
    ignore_marker: bool = False,
    source_name: str = "",
    target_name: str = "",
) -> VerifyReport:
    """Compare every row of ``actual`` with ``expected`` converted by the migration rules.

    Rows the conversion rejects (they would be quarantined) are expected to be absent.
    Rows are compared by checksum in key order, values column by column when they
    differ; embeddings bit for bit.
    """
    started = time.perf_counter()
    progress = progress or TransferProgress()
    _, dims_e = await read_dims(expected)
    meta_a, _ = await read_dims(actual)
    marker = None
    if MIGRATION_MARKER in meta_a and not ignore_marker:
        try:
            marker = json.loads(meta_a[MIGRATION_MARKER])
        except ValueError:
            marker = {"value": meta_a[MIGRATION_MARKER]}
    # Both sides are read with the source's vector sizes: a target vector of another
    # size is then reported, not silently accepted.
    e, a = Side(expected, timezone, dims_e), Side(actual, timezone, dims_e)
    tables: dict[str, TableDiff] = {}

    async def small(spec: TableSpec) -> tuple[dict[Any, Row], dict[Any, Row], TableCompare]:
        cmp = TableCompare(spec, max_diffs)
        exp: dict[Any, Row] = {}
        act: dict[Any, Row] = {}
        for raw in await expected.read_all(spec):
            row, _ = e.convert(spec, raw)
            if row is None:
                cmp.diff.source_quarantined += 1
            elif not (spec is META and row[0] in UNMOVED_META_KEYS):
                exp[row[spec.key_index]] = row
        for raw in await actual.read_all(spec):
            row, reason = a.convert(spec, raw)
            if row is None:
                cmp.diff.target_rows += 1
                cmp.invalid(key_text(raw[spec.key_index]), reason or "")
            elif not (spec is META and row[0] in UNMOVED_META_KEYS):
                act[row[spec.key_index]] = row
        cmp.diff.expected_rows = len(exp)
        cmp.diff.target_rows += len(act)
        return exp, act, cmp

    def finish_small(
        spec: TableSpec, exp: dict[Any, Row], act: dict[Any, Row], cmp: TableCompare
    ) -> None:
        for key in sorted(exp.keys() | act.keys(), key=lambda k: (str(type(k)), k)):
            if key not in act:
                cmp.expected_only(key)
            elif key not in exp:
                cmp.target_only(key)
            else:
                cmp.both(key, comparable(spec, exp[key]), comparable(spec, act[key]))
        tables[spec.name] = cmp.finish()

    meta = await small(META)
    finish_small(META, *meta)
    sessions = await small(SESSIONS)
    await compare_large(MESSAGES, e, a, tables, batch_size, max_diffs, progress)
    # A session's message_count is the number of its messages that moved.
    exp_sessions = {
        k: (*r[:8], e.conv.message_counts.get(k, 0), *r[9:]) for k, r in sessions[0].items()
    }
    finish_small(SESSIONS, exp_sessions, sessions[1], sessions[2])
    await compare_large(MESSAGE_REFS, e, a, tables, batch_size, max_diffs, progress)
    finish_small(SOURCES, *(await small(SOURCES)))
    for spec in (CHUNKS, CHUNK_MESSAGES, REEMBED, MEMORIES, USAGE):
        await compare_large(spec, e, a, tables, batch_size, max_diffs, progress)
    integrity = await actual.integrity()
    ordered = {t.name: tables[t.name] for t in TABLES}
    return VerifyReport(
        source=source_name or expected.location,
        target=target_name or actual.location,
        tables=ordered,
        integrity=integrity,
        marker=marker,
        seconds=time.perf_counter() - started,
    )


async def side_items(
    side: Side, spec: TableSpec, batch: int, progress: TransferProgress, task: str | None
) -> AsyncIterator[tuple[int, Row | None, str | None, Any]]:
    async for raws in prefetch(side.store.batches(spec, after=None, size=batch)):
        for raw in raws:
            row, reason = side.convert(spec, raw)
            if row is not None and spec is CHUNKS:
                side.chunk_ids.add(row[0])
            elif row is not None and spec is MESSAGES:
                side.message_ids.add(row[0])
            yield int(raw[spec.key_index]), row, reason, raw
        if task is not None:
            progress.advance(task, len(raws))


async def compare_large(
    spec: TableSpec,
    e: Side,
    a: Side,
    tables: dict[str, TableDiff],
    batch: int,
    max_diffs: int,
    progress: TransferProgress,
) -> None:
    cmp = TableCompare(spec, max_diffs)
    task = f"verify {spec.name}"
    progress.begin(task, await e.store.count(spec))
    exp_it = side_items(e, spec, batch, progress, task)
    act_it = side_items(a, spec, batch, progress, None)
    x = await anext(exp_it, None)
    y = await anext(act_it, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            assert x is not None
            if x[1] is None:
                cmp.diff.source_quarantined += 1
            else:
                cmp.diff.expected_rows += 1
                cmp.expected_only(x[0])
            x = await anext(exp_it, None)
        elif x is None or y[0] < x[0]:
            cmp.diff.target_rows += 1
            if y[1] is None:
                cmp.invalid(y[0], y[2] or "")
            else:
                cmp.target_only(y[0])
            y = await anext(act_it, None)
        else:
            cmp.diff.target_rows += 1
            if x[1] is None:
                cmp.diff.source_quarantined += 1
                cmp.target_only(x[0])
            else:
                cmp.diff.expected_rows += 1
                if y[1] is None:
                    cmp.invalid(y[0], y[2] or "")
                else:
                    cmp.both(x[0], comparable(spec, x[1]), comparable(spec, y[1]))
            x = await anext(exp_it, None)
            y = await anext(act_it, None)
    progress.end(task)
    tables[spec.name] = cmp.finish()


async def verify(
    source_url: str,
    target_url: str,
    *,
    settings: Settings,
    source_timezone: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_diffs: int = DEFAULT_MAX_DIFFS,
    progress: TransferProgress | None = None,
) -> VerifyReport:
    """Compare a target with its source (a legacy source is converted first)."""
    progress = progress or TransferProgress()
    timezone, _ = resolve_timezone(source_timezone)
    if identity(source_url) == identity(target_url):
        raise ConfigError("source and target are the same database")
    quarantine = Quarantine(None)
    async with (
        endpoint_for(source_url, settings).source(
            timezone=timezone,
            backup_dir=None,
            quarantine=quarantine,
            report=None,
            progress=progress,
        ) as source,
        endpoint_for(target_url, settings).reader("target") as target,
    ):
        report = await compare(
            source.store,
            target,
            timezone=timezone,
            batch_size=batch_size,
            max_diffs=max_diffs,
            progress=progress,
            source_name=display_url(source_url),
            target_name=display_url(target_url),
        )
    if quarantine.count:
        # Legacy rows the conversion sets aside are expected to be absent, like the
        # quarantined rows of a current source.
        for table, n in quarantine.by_table.items():
            if table in report.tables:
                report.tables[table].source_quarantined += n
    return report


async def table_checksums(store: RowStore, *, batch_size: int = DEFAULT_BATCH) -> dict[str, Any]:
    """Rows and a checksum per table, as stored (for backup manifests).

    The checksum folds each row's :func:`~kotonoha_bot.transfer.rowconv.row_digest` in key
    order, exactly like :func:`compare`'s table checksums.
    """
    _, dims = await read_dims(store)
    side = Side(store, UTC, dims)
    out: dict[str, Any] = {}
    for spec in TABLES:
        h = hashlib.blake2b(digest_size=16)
        rows = invalid = 0
        if spec.large:
            async for key, row, _reason, _raw in side_items(
                side, spec, batch_size, TransferProgress(), None
            ):
                rows += 1
                if row is None:
                    invalid += 1
                    h.update(b"invalid" + repr(key).encode())
                else:
                    h.update(repr(key).encode() + row_digest(comparable(spec, row)))
        else:
            converted: dict[Any, Row] = {}
            for raw in await store.read_all(spec):
                rows += 1
                row, _reason = side.convert(spec, raw)
                if row is None:
                    invalid += 1
                else:
                    converted[row[spec.key_index]] = row
            for key in sorted(converted, key=lambda k: (str(type(k)), k)):
                h.update(repr(key).encode() + row_digest(comparable(spec, converted[key])))
        out[spec.name] = {"rows": rows, "invalid": invalid, "checksum": h.hexdigest()}
    return out
