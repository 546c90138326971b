"""The systems compared, behind one small interface.

Each system is built once per data set (``build``), can be searched in one of several
settings (``variants``: ef_search, probes...), and reports its insert and index-build
time, disk size and memory. Searches return row numbers of the data set so recall is
computed the same way for all. ``search`` is a coroutine; blocking systems run on the
calling thread for one client and on a thread pool for concurrent clients.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_sqlite import TOP_K, chunk_text, fill, row_of, settings
from benchmarks.data import GUILD_ID, SCOPES, Dataset
from benchmarks.util import dir_bytes, files_bytes, rss_bytes, tree_pss_bytes
from kotonoha_bot.config import Settings

BATCH = 1000
HNSW_INSERT_ROWS = 3000  # rows inserted with the HNSW index maintained (PostgreSQL)


@dataclass
class BuildInfo:
    """What building a system cost."""

    insert_s: float = float("nan")
    index_s: float = float("nan")
    disk_bytes: int | None = None
    memory_bytes: int | None = None
    memory_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class System:
    """A searchable system. Subclasses implement the hooks below."""

    name = "?"
    #: True when searches block the event loop (run on threads for concurrency).
    blocking = True

    def __init__(self) -> None:
        self.info = BuildInfo()
        self.variant: str = "default"

    def variants(self) -> list[str]:
        """Settings to sweep (e.g. ef_search values)."""
        return ["default"]

    def default_variant(self) -> str:
        """The setting a user gets without tuning."""
        return self.variants()[0]

    async def use(self, variant: str) -> None:
        """Switch to a variant (may rebuild an index)."""
        self.variant = variant

    async def build(self, ds: Dataset, workdir: Path) -> None:
        raise NotImplementedError

    def search_sync(self, q: np.ndarray, channel: int | None) -> list[int]:
        raise NotImplementedError

    async def search(self, q: np.ndarray, channel: int | None) -> list[int]:
        return self.search_sync(q, channel)

    async def close(self) -> None:
        return None


# --- the exact reference -------------------------------------------------------------


class NumpyExact(System):
    """A plain numpy brute force over a normalised matrix (exact reference)."""

    name = "numpy exact"

    async def build(self, ds: Dataset, workdir: Path) -> None:
        t = time.perf_counter()
        self.m = np.ascontiguousarray(ds.vectors)
        self.rows = {ch: ds.scope_rows(s) for s, ch in SCOPES.items() if ch is not None}
        self.info.insert_s = time.perf_counter() - t
        self.info.memory_bytes = self.m.nbytes
        self.info.memory_note = "matrix"

    def search_sync(self, q: np.ndarray, channel: int | None) -> list[int]:
        if channel is None:
            scores, rows = self.m @ q, None
        else:
            rows = self.rows[channel]
            scores = self.m[rows] @ q
        k = min(TOP_K, scores.shape[0])
        part = np.argpartition(-scores, k - 1)[:k]
        best = part[np.argsort(-scores[part])]
        return (best if rows is None else rows[best]).tolist()


# --- our backends --------------------------------------------------------------------


class OursSQLite(System):
    """kotonoha's SQLiteDatabase through the public contract, with one vector cache kind.

    Several instances may share one database file (``shared``): the file is filled once
    and each instance opens it with its own ``SQLITE_VECTOR_CACHE``.
    """

    blocking = False

    def __init__(self, kind: str | None = None, shared: OursSQLite | None = None) -> None:
        super().__init__()
        self.kind = kind or str(Settings.model_fields["sqlite_vector_cache"].default)
        self.shared = shared
        self.name = sqlite_name(self.kind)
        self.db: Any = None

    async def build(self, ds: Dataset, workdir: Path) -> None:
        from kotonoha_bot.db import open_database

        if self.shared is None:
            self.path = workdir / "ours.db"
            async with open_database(self.url, settings=settings()) as db:
                self.info.insert_s = await fill(db, ds, BATCH)
        else:
            self.path = self.shared.path
            self.info.insert_s = self.shared.info.insert_s
        gc.collect()
        rss0 = rss_bytes()
        self.db = open_database(self.url, settings=settings(sqlite_vector_cache=self.kind))
        await self.db.initialize()
        t = time.perf_counter()
        await self.search(ds.queries[0], None)
        self.info.index_s = time.perf_counter() - t  # loading the vector cache
        gc.collect()
        stats = await self.db.stats()
        self.info.memory_bytes = stats.details.get("vector_cache_bytes")
        self.info.memory_note = f"cache; RSS Δ {(rss_bytes() - rss0) / 2**20:,.0f} MiB"
        self.info.extra["rss_delta_bytes"] = rss_bytes() - rss0
        self.info.extra["vector_search"] = stats.details.get("vector_search")
        self.info.disk_bytes = files_bytes(workdir, "ours.db*")

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    async def search(self, q: np.ndarray, channel: int | None) -> list[int]:
        hits = await self.db.similarity_search(
            q, guild_id=GUILD_ID, channel_id=channel, top_k=TOP_K
        )
        return [row_of(h.content) for h in hits]

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None


def sqlite_name(kind: str) -> str:
    """The report's name of our SQLite backend with one cache kind."""
    return "ours SQLite (float32, exact)" if kind == "float32" else f"ours SQLite ({kind})"


class OursPostgres(System):
    """kotonoha's PostgreSQLDatabase (HNSW, then IVFFlat) through the public contract."""

    blocking = False
    HNSW_EF = (16, 24, 32, 40, 56, 64, 100, 160)

    def default_variant(self) -> str:
        """Our settings' defaults (HNSW_EF_SEARCH unset = chosen by the index's size)."""
        ef = Settings.model_fields["hnsw_ef_search"].default
        return f"hnsw ef_search={'auto' if ef is None else ef}"

    IVF_PROBES = (3, 10, 30)

    def __init__(self, server: Any, raw: bool = False) -> None:
        super().__init__()
        self.server = server
        self.db: Any = None
        self.kind = "hnsw"
        self.name = "ours PostgreSQL"

    def variants(self) -> list[str]:
        return (
            [self.default_variant()]
            + [f"hnsw ef_search={e}" for e in self.HNSW_EF]
            + [f"ivfflat probes={p}" for p in self.IVF_PROBES]
        )

    def _settings(self, variant: str) -> Any:
        return self._settings_for(self.url, variant)

    @staticmethod
    def _settings_for(url: str, variant: str) -> Any:
        kind, _, value = variant.partition(" ")
        number = int(value.split("=")[1]) if value and not value.endswith("auto") else None
        extra: dict[str, Any] = {"vector_index_type": kind}
        if kind == "hnsw" and number:
            extra["hnsw_ef_search"] = number
        if kind == "ivfflat" and number:
            extra["ivfflat_probes"] = number
        return settings(database_type="postgres", database_url=url, **extra)

    async def build(self, ds: Dataset, workdir: Path) -> None:
        from kotonoha_bot.db import open_database

        # Steady-state writes as the bot does them: the HNSW index exists from the first
        # embedding config on, so every insert also goes into the graph. Measured on the
        # first HNSW_INSERT_ROWS rows in a database of their own (at 100k it would take
        # longer than everything else together).
        self.rows, self.dim = ds.n, ds.dim
        n_hnsw = min(HNSW_INSERT_ROWS, ds.n)
        url = await self.server.create_database("bench_ins")
        try:
            async with open_database(url, settings=self._settings_for(url, "hnsw")) as db:
                secs = await fill(db, ds.head(n_hnsw), BATCH)
            self.info.extra["hnsw_insert_rows"] = n_hnsw
            self.info.extra["hnsw_insert_rows_per_s"] = n_hnsw / secs
        finally:
            await self.server.drop_database(url)
        # The data set itself: a bulk load with the IVFFlat setting (its index is trained
        # once 1,000 rows exist and is cheap to maintain), then the HNSW build.
        self.url = await self.server.create_database("bench")
        async with open_database(self.url, settings=self._settings("ivfflat")) as db:
            self.info.insert_s = await fill(db, ds, BATCH)
        async with open_database(self.url, settings=self._settings("hnsw")) as db:
            t = time.perf_counter()
            await db.rebuild_vector_index()
            self.info.index_s = time.perf_counter() - t
        self.info.extra["hnsw_build_s"] = self.info.index_s
        self.info.extra["sizes_hnsw"] = await self.sizes()
        await self.analyze()

    async def analyze(self) -> None:
        """Give the planner statistics now, as autovacuum soon would after a bulk load.

        Without them the first queries after the load may plan a sequential scan.
        """
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("VACUUM ANALYZE knowledge_chunks")
        finally:
            await conn.close()

    async def sizes(self) -> dict[str, int]:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            row = await conn.fetchrow(
                "SELECT pg_total_relation_size('knowledge_chunks') AS total,"
                " pg_relation_size('knowledge_chunks') AS heap,"
                " coalesce(pg_relation_size(to_regclass('knowledge_chunks_embedding_ann_idx')), 0)"
                " AS ann, pg_database_size(current_database()) AS db"
            )
        finally:
            await conn.close()
        return dict(row)

    async def use(self, variant: str) -> None:
        from kotonoha_bot.db import open_database

        kind = variant.split(" ", 1)[0]
        if self.db is not None:
            await self.db.close()
            self.db = None
        if kind != self.kind:
            async with open_database(self.url, settings=self._settings(kind)) as db:
                t = time.perf_counter()
                await db.rebuild_vector_index()
                self.info.extra[f"{kind}_build_s"] = time.perf_counter() - t
            self.info.extra[f"sizes_{kind}"] = await self.sizes()
            await self.analyze()
            self.kind = kind
        self.db = open_database(self.url, settings=self._settings(variant))
        await self.db.initialize()
        self.variant = variant

    async def search(self, q: np.ndarray, channel: int | None) -> list[int]:
        hits = await self.db.similarity_search(
            q, guild_id=GUILD_ID, channel_id=channel, top_k=TOP_K
        )
        return [row_of(h.content) for h in hits]

    def memory(self) -> None:
        """PostgreSQL's memory now (server tree PSS), after searching."""
        if self.server.pid:
            self.info.memory_bytes = tree_pss_bytes(self.server.pid)
            self.info.memory_note = "server PSS (shared_buffers 1 GB)"

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
        sizes = self.info.extra.get("sizes_hnsw", {})
        self.info.disk_bytes = sizes.get("total")
        await self.server.drop_database(self.url)


class RawPostgres(System):
    """The ADR's plain SQL on the same server, table and index as ours (asyncpg + pgvector).

    One statement per query, the GUCs set once per connection, no scope count, no
    transaction, no join to the sources: the floor our backend's overhead is measured
    against. It follows ``OursPostgres``'s current index.
    """

    blocking = False
    name = "raw SQL (same server)"

    def __init__(self, ours: OursPostgres) -> None:
        super().__init__()
        self.ours = ours
        self.pool: Any = None

    def variants(self) -> list[str]:
        return self.ours.variants()

    def default_variant(self) -> str:
        return self.ours.default_variant()

    async def build(self, ds: Dataset, workdir: Path) -> None:
        return None

    async def use(self, variant: str) -> None:
        import asyncpg
        from pgvector.asyncpg import register_vector

        if self.pool is not None:
            await self.pool.close()
        kind, _, value = variant.partition(" ")
        number = value.split("=")[1]
        if number == "auto":  # what ours chose for this graph
            from kotonoha_bot.db.postgres.search_plan import ef_search_for

            number = str(ef_search_for(self.ours.rows, dimension=self.ours.dim))
        # Startup parameters, not SET: the pool's RESET ALL on release keeps these.
        gucs = (
            {"hnsw.ef_search": number, "hnsw.iterative_scan": "relaxed_order"}
            if kind == "hnsw"
            else {"ivfflat.probes": number, "ivfflat.iterative_scan": "relaxed_order"}
        )
        self.pool = await asyncpg.create_pool(
            self.ours.url, min_size=8, max_size=8, init=register_vector, server_settings=gucs
        )
        # ORDER BY what the index holds (a halfvec index needs its own expression), as
        # anyone writing the query by hand against this schema would.
        from kotonoha_bot.db.postgres.schema import ANN_INDEX_NAME
        from kotonoha_bot.db.postgres.search_plan import IndexPlan

        indexdef = await self.pool.fetchval(
            "SELECT pg_get_indexdef(to_regclass($1))", ANN_INDEX_NAME
        )
        plan = IndexPlan.for_dimension(
            self.ours.dim,
            kind,
            IndexPlan.precision_of(indexdef) or "float32",  # type: ignore[arg-type]
        )
        self.order = f"{plan.key_sql('embedding')} <=> {plan.query_sql('$1')}"
        self.variant = variant

    async def search(self, q: np.ndarray, channel: int | None) -> list[int]:
        if channel is None:
            rows = await self.pool.fetch(
                "SELECT content, 1 - (embedding <=> $1) AS similarity FROM knowledge_chunks"
                f" WHERE guild_id = $2 ORDER BY {self.order} LIMIT $3",
                q,
                GUILD_ID,
                TOP_K,
            )
        else:
            rows = await self.pool.fetch(
                "SELECT content, 1 - (embedding <=> $1) AS similarity FROM knowledge_chunks"
                f" WHERE guild_id = $2 AND channel_id = $3 ORDER BY {self.order} LIMIT $4",
                q,
                GUILD_ID,
                channel,
                TOP_K,
            )
        return [row_of(r["content"]) for r in rows]

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


# --- sqlite-vec ----------------------------------------------------------------------


class SqliteVec(System):
    """sqlite-vec's vec0 table (brute-force KNN, cosine) through apsw, filter columns inline."""

    name = "sqlite-vec (brute force)"

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def _connect(self) -> Any:
        import apsw
        import sqlite_vec

        conn = apsw.Connection(str(self.path))
        conn.enable_load_extension(True)
        conn.load_extension(sqlite_vec.loadable_path())
        conn.enable_load_extension(False)
        return conn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            self._conns.append(conn)
        return conn

    async def build(self, ds: Dataset, workdir: Path) -> None:
        self.path = workdir / "sqlite-vec.db"
        self._conns: list[Any] = []
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(
            f"CREATE VIRTUAL TABLE chunks USING vec0(embedding float[{ds.dim}]"
            " distance_metric=cosine, guild_id integer, channel_id integer,"
            " +content text)"
        )
        t = time.perf_counter()
        for start in range(0, ds.n, BATCH):
            stop = min(start + BATCH, ds.n)
            with conn:  # one transaction per batch, like save_source
                conn.executemany(
                    "INSERT INTO chunks (rowid, embedding, guild_id, channel_id, content)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [
                        (i + 1, ds.vectors[i].tobytes(), GUILD_ID, int(ds.channels[i]), text)
                        for i in range(start, stop)
                        for text in (chunk_text(i),)
                    ],
                )
        self.info.insert_s = time.perf_counter() - t
        conn.close()
        self.info.disk_bytes = files_bytes(workdir, "sqlite-vec.db*")
        gc.collect()
        rss0 = rss_bytes()
        self.search_sync(ds.queries[0], None)
        self.info.memory_bytes = rss_bytes() - rss0
        self.info.memory_note = "RSS Δ (reads through the page cache)"

    def search_sync(self, q: np.ndarray, channel: int | None) -> list[int]:
        conn = self._conn()
        if channel is None:
            rows = conn.execute(
                "SELECT rowid, distance FROM chunks WHERE embedding MATCH ? AND k = ?"
                " AND guild_id = ?",
                (q.tobytes(), TOP_K, GUILD_ID),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT rowid, distance FROM chunks WHERE embedding MATCH ? AND k = ?"
                " AND guild_id = ? AND channel_id = ?",
                (q.tobytes(), TOP_K, GUILD_ID, channel),
            ).fetchall()
        return [int(r[0]) - 1 for r in rows]

    async def close(self) -> None:
        for c in self._conns:
            c.close()
        self._conns.clear()


# --- Chroma --------------------------------------------------------------------------


class Chroma(System):
    """Chroma embedded (PersistentClient in a temp dir), HNSW cosine, a collection per guild."""

    name = "Chroma (HNSW)"
    EF = (20, 40, 100, 200)

    def variants(self) -> list[str]:
        return [f"hnsw ef_search={e}" for e in self.EF]

    def default_variant(self) -> str:
        return "hnsw ef_search=100"  # Chroma's own default

    async def build(self, ds: Dataset, workdir: Path) -> None:
        import chromadb

        self.dir = workdir / "chroma"
        self.dim = ds.dim
        gc.collect()
        rss0 = rss_bytes()
        self.client = chromadb.PersistentClient(
            path=str(self.dir), settings=chromadb.Settings(anonymized_telemetry=False)
        )
        self.col = self.client.create_collection(
            "bench",
            configuration={
                "hnsw": {"space": "cosine", "ef_construction": 100, "max_neighbors": 16}
            },
            embedding_function=None,
        )
        batch = min(self.client.get_max_batch_size(), 5000)
        t = time.perf_counter()
        for start in range(0, ds.n, batch):
            stop = min(start + batch, ds.n)
            self.col.add(
                ids=[str(i) for i in range(start, stop)],
                embeddings=ds.vectors[start:stop],
                metadatas=[
                    {"guild_id": GUILD_ID, "channel_id": int(ds.channels[i])}
                    for i in range(start, stop)
                ],
                documents=[chunk_text(i) for i in range(start, stop)],
            )
        self.info.insert_s = time.perf_counter() - t  # the HNSW graph is built while adding
        self.info.index_s = float("nan")
        self.search_sync(ds.queries[0], None)
        self.info.memory_bytes = rss_bytes() - rss0
        self.info.memory_note = "RSS Δ (in process)"
        self.info.disk_bytes = dir_bytes(self.dir)

    async def use(self, variant: str) -> None:
        import chromadb

        ef = int(variant.split("=")[1])
        self.col.modify(configuration={"hnsw": {"ef_search": ef}})
        # A loaded index keeps the ef it was opened with: drop the client's caches and
        # reopen so the new ef_search is in force.
        self.client.clear_system_cache()
        self.client = chromadb.PersistentClient(
            path=str(self.dir), settings=chromadb.Settings(anonymized_telemetry=False)
        )
        self.col = self.client.get_collection("bench")
        self.search_sync(np.ones(self.dim, dtype=np.float32), None)  # load the index
        self.variant = variant

    def search_sync(self, q: np.ndarray, channel: int | None) -> list[int]:
        # One collection per guild (how a multi-guild bot would use Chroma), so the
        # guild scope needs no filter; a channel is a metadata filter.
        where = None if channel is None else {"channel_id": channel}
        res = self.col.query(query_embeddings=q[None, :], n_results=TOP_K, where=where, include=[])
        return [int(i) for i in res["ids"][0]]

    async def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.client.clear_system_cache()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- running queries -----------------------------------------------------------------


async def run_queries(
    system: System, queries: Sequence[np.ndarray], channel: int | None
) -> tuple[list[float], list[list[int]]]:
    """One client, sequential: per-query seconds and results."""
    seconds: list[float] = []
    found: list[list[int]] = []
    for q in queries:
        t = time.perf_counter()
        rows = await system.search(q, channel)
        seconds.append(time.perf_counter() - t)
        found.append(rows)
    return seconds, found


async def run_concurrent(
    system: System, queries: Sequence[np.ndarray], channel: int | None, clients: int
) -> float:
    """Queries per second with ``clients`` concurrent clients splitting ``queries``."""
    parts = [list(queries[i::clients]) for i in range(clients)]
    if system.blocking:
        with ThreadPoolExecutor(clients) as pool:
            t = time.perf_counter()

            def client(part: list[np.ndarray]) -> None:
                for q in part:
                    system.search_sync(q, channel)

            list(pool.map(client, parts))
            return len(queries) / (time.perf_counter() - t)

    async def aclient(part: list[np.ndarray]) -> None:
        for q in part:
            await system.search(q, channel)

    t = time.perf_counter()
    await asyncio.gather(*(aclient(p) for p in parts))
    return len(queries) / (time.perf_counter() - t)
