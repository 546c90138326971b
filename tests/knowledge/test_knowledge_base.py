"""Ingest, pending embeddings, hybrid search, re-embedding and archiving.

Every test runs on both backends (the ``db`` fixture). The OpenAI embedder is the
real SDK client talking to the fake API server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import EmbeddingModelMismatchError
from kotonoha_bot.knowledge.archive import (
    archive_idle_sessions,
    archive_left_history,
    archive_session,
    rearchive,
    windows,
)
from kotonoha_bot.knowledge.embeddings.base import embedding_config
from kotonoha_bot.knowledge.embeddings.hashing import HashingEmbeddingProvider
from kotonoha_bot.knowledge.embeddings.openai_api import OpenAIEmbeddingProvider
from kotonoha_bot.knowledge.ingest import embed_pending, ingest_paths, reembed
from kotonoha_bot.knowledge.search import (
    DEFAULT_PROFILE,
    EXACT_LEAD_SOURCES,
    FUSION_PROFILES,
    FusionProfile,
    RankedHit,
    fuse,
    nothing_relevant,
    search_knowledge,
)
from kotonoha_bot.models import ChatSession, Message, SearchHit
from tests.fakes.api_server import FakeAPIServer, Reply, fake_api_fixture

fake_api = fake_api_fixture(embedding_dimension=64)


class CountingEmbedder(HashingEmbeddingProvider):
    """The hashing embedder, counting how many texts it was asked to embed."""

    def __init__(self, dimension: int = 256, model: str | None = None) -> None:
        super().__init__(dimension=dimension, model=model)
        self.texts = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:  # type: ignore[override]
        self.texts += len(texts)
        return await super().embed(texts)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    write(
        folder, "meeting.md", "# 定例会議\n\n次の会議は東京の本社で開きます。締切は金曜日です。\n"
    )
    write(
        folder,
        "club.md",
        "# Book club\n\nWe read Kafka on the Shore this month. 感想を共有しましょう。\n",
    )
    write(folder, "ops.txt", "Backups run nightly at 03:00. The restore drill is monthly.\n")
    write(folder, "sub/zeta.md", "プロジェクトZX-81の仕様書です。担当は佐藤さん。\n")
    write(folder, ".hidden/skip.md", "should not be ingested\n")
    write(folder, "image.png", "not text\n")
    return folder


async def test_ingest_then_reingest_skips_unchanged(db: DatabaseProtocol, corpus: Path) -> None:
    emb = CountingEmbedder()
    first = await ingest_paths(db, emb, [corpus], guild_id=1, max_chars=200, overlap_chars=20)
    assert len(first.added) == 4 and not first.failed
    assert {Path(u).name for u in first.added} == {"meeting.md", "club.md", "ops.txt", "zeta.md"}
    calls = emb.texts
    assert calls > 0

    second = await ingest_paths(db, emb, [corpus], guild_id=1, max_chars=200, overlap_chars=20)
    assert len(second.unchanged) == 4 and not second.added and not second.updated
    assert emb.texts == calls  # nothing re-embedded

    write(corpus, "ops.txt", "Backups now run hourly. The restore drill is weekly.\n")
    third = await ingest_paths(db, emb, [corpus], guild_id=1, max_chars=200, overlap_chars=20)
    assert len(third.updated) == 1 and len(third.unchanged) == 3
    hits = (await search_knowledge(db, emb, "backups", guild_id=1, mode="keyword")).hits
    assert [h.hit.content for h in hits] == ["Backups now run hourly. The restore drill is weekly."]
    assert (await db.stats()).sources == 4


async def test_keyword_and_hybrid_find_short_japanese_words_and_codes(
    db: DatabaseProtocol, corpus: Path
) -> None:
    emb = HashingEmbeddingProvider(dimension=256)
    await ingest_paths(db, emb, [corpus], guild_id=1)
    for query, expected in (
        ("会議", "meeting.md"),
        ("東京", "meeting.md"),
        ("締切", "meeting.md"),
        ("ZX-81", "zeta.md"),
        ("佐藤", "zeta.md"),
        ("Kafka", "club.md"),
    ):
        for mode in ("keyword", "hybrid"):
            result = await search_knowledge(db, emb, query, guild_id=1, mode=mode, top_k=3)
            assert result.hits, (query, mode)
            assert result.hits[0].hit.source_uri.endswith(expected), (query, mode)
    # Another guild sees nothing.
    assert not (await search_knowledge(db, emb, "会議", guild_id=2)).hits


async def test_failing_embedding_server_leaves_pending_then_embed_pending_finishes(
    db: DatabaseProtocol, corpus: Path, fake_api: FakeAPIServer
) -> None:
    emb = OpenAIEmbeddingProvider(
        api_key="sk-test-knowledge",
        base_url=fake_api.openai_base_url,
        dimension=64,
        model="text-embedding-3-small",
        max_retries=2,
        timeout=5,
    )
    try:
        # 429 then success: the SDK retries, the first file is embedded.
        fake_api.script("embeddings", [Reply(429), Reply(200)])
        # Then the service breaks: each of the other 3 files gets a 500 and 2 retries.
        fake_api.script("embeddings", [Reply(500)] * 9)
        report = await ingest_paths(db, emb, [corpus], guild_id=1)
        assert len(report.added) == 1 and len(report.pending) == 3 and not report.failed
        stats = await db.stats()
        assert stats.sources == 4 and stats.pending_chunks > 0
        assert len(await db.list_sources(status="pending")) == 3
        # Keyword search already works on pending chunks.
        assert (await search_knowledge(db, None, "締切", guild_id=1, mode="keyword")).hits

        assert fake_api.pending("embeddings") == 0  # every scripted failure was hit
        done = await embed_pending(db, emb, batch_size=2)
        assert done == stats.pending_chunks
        assert (await db.stats()).pending_chunks == 0
        assert len(await db.list_sources(status="ready")) == 4
        vec = await search_knowledge(db, emb, "締切", guild_id=1, mode="vector", top_k=10)
        assert len(vec.hits) == (await db.stats()).chunks
    finally:
        await emb.aclose()


async def test_changing_model_is_refused_until_reembed(db: DatabaseProtocol, corpus: Path) -> None:
    old = HashingEmbeddingProvider(dimension=256)
    new = HashingEmbeddingProvider(dimension=128)
    await ingest_paths(db, old, [corpus], guild_id=1)
    with pytest.raises(EmbeddingModelMismatchError) as info:
        await ingest_paths(db, new, [corpus], guild_id=1)
    assert "256" in str(info.value) and "128" in str(info.value)

    # Re-embed in small batches while searches with the old model keep answering.
    await db.begin_reembed(_config(new))
    todo = await db.reembed_todo(1)
    vectors = await new.embed([t.content for t in todo])
    await db.store_reembed([(todo[0].chunk_id, vectors[0])])
    during = await search_knowledge(db, old, "締切", guild_id=1, mode="vector", top_k=1)
    assert during.hits and during.hits[0].hit.source_uri.endswith("meeting.md")

    await reembed(db, new, batch_size=2)  # resumes and switches
    cfg = await db.get_embedding_config()
    assert cfg is not None and cfg.dimension == 128
    after = await search_knowledge(db, new, "締切", guild_id=1, mode="vector", top_k=1)
    assert after.hits and after.hits[0].hit.source_uri.endswith("meeting.md")
    await ingest_paths(db, new, [corpus], guild_id=1)  # the new model is accepted now


def _config(provider: HashingEmbeddingProvider):  # type: ignore[no-untyped-def]
    from kotonoha_bot.knowledge.embeddings import embedding_config

    return embedding_config(provider)


def _session(key: str, guild: int | None, channel: int, n: int, start: datetime) -> ChatSession:
    s = ChatSession(key, "mention" if guild else "dm", guild_id=guild, channel_id=channel)
    s.created_at = start
    for i in range(n):
        ts = start + timedelta(seconds=i)
        if i % 2 == 0:
            s.add_message(
                Message("user", f"質問{i} について ({key})", ts, 100 + i % 3, f"user{i % 3}")
            )
        else:
            s.add_message(Message("assistant", f"答え{i} です", ts))
    s.last_active_at = start + timedelta(seconds=n)
    return s


async def test_turns_leaving_the_history_are_archived_once_then_idle_archiving_continues(
    db: DatabaseProtocol,
) -> None:
    emb = HashingEmbeddingProvider(dimension=128)
    await db.set_embedding_config(embedding_config(emb))
    old = datetime.now(UTC) - timedelta(hours=3)
    await db.save_session(_session("mention:live", 5, 50, 10, old))
    # Messages 0-5 left the history window of the live session: searchable at once.
    assert await archive_left_history(db, emb, "mention:live", upto=5, window=4, overlap=1) > 0
    stored = await db.load_session("mention:live")
    assert stored is not None and stored.last_archived_message_index == 5
    found = await search_knowledge(db, emb, "質問4", guild_id=5, mode="keyword", top_k=5)
    assert any("質問4" in h.hit.content for h in found.hits)
    assert not any("質問6" in h.hit.content for h in found.hits)  # still in the history
    again = await archive_left_history(db, emb, "mention:live", upto=5, window=4, overlap=1)
    assert again == 0
    # Later the session idles: the idle pass continues after message 5, nothing twice.
    await archive_idle_sessions(db, emb, idle_minutes=60, window=4, overlap=1)
    (source,) = await db.list_sources(guild_id=5)
    spans = sorted(
        (c.metadata["first_index"], c.metadata["last_index"])
        for c in await db.list_chunks(source.source_id)
    )
    covered = [i for a, b in spans for i in range(a, b + 1)]
    assert set(covered) == set(range(10))
    assert len({a for a, _ in spans}) == len(spans)
    # Each message is in at most two windows (a window and its neighbour's overlap).
    assert max(covered.count(i) for i in range(10)) <= 2
    stored = await db.load_session("mention:live")
    assert stored is not None and stored.last_archived_message_index == 9


async def test_archiving_is_idempotent_scoped_and_incremental(db: DatabaseProtocol) -> None:
    emb = HashingEmbeddingProvider(dimension=128)
    old = datetime.now(UTC) - timedelta(hours=5)
    a = _session("mention:a", 10, 1, 11, old)
    b = _session("mention:b", 20, 2, 5, old)
    dm = _session("dm:c", None, 3, 4, old)
    fresh = _session("mention:d", 10, 1, 4, datetime.now(UTC))
    for s in (a, b, dm, fresh):
        await db.save_session(s)

    first = await archive_idle_sessions(db, emb, idle_minutes=60, window=4, overlap=1)
    assert sorted(first.sessions) == ["mention:a", "mention:b"]
    assert first.skipped_dm == 1
    expected_a = len(windows(a.messages, 0, size=4, overlap=1))
    assert first.chunks_added == expected_a + len(windows(b.messages, 0, size=4, overlap=1))

    again = await archive_idle_sessions(db, emb, idle_minutes=60, window=4, overlap=1)
    assert again.chunks_added == 0 and again.sessions == []

    src = await db.find_source(10, "session:mention:a")
    assert src is not None and src.channel_id == 1 and src.source_type == "conversation"
    chunks = await db.list_chunks(src.source_id)  # type: ignore[arg-type]
    assert len(chunks) == expected_a
    assert chunks[0].content.startswith("user0: 質問0")
    assert "kotonoha: 答え1 です" in chunks[0].content
    assert all(c.guild_id == 10 and c.channel_id == 1 for c in chunks)
    assert set(chunks[0].metadata["author_ids"]) <= {100, 101, 102}
    # Scoped: guild 20 never sees guild 10's conversation, DMs never become knowledge.
    hits = await search_knowledge(db, emb, "mention:a", guild_id=20, mode="hybrid", top_k=20)
    assert all(h.hit.guild_id == 20 for h in hits.hits)
    assert await db.find_source(0, "session:dm:c") is None
    assert (await db.load_session("mention:a")).last_archived_message_index == 10  # type: ignore[union-attr]

    # New turns later: only the new part (with overlap) is archived.
    loaded = await db.load_session("mention:a")
    assert loaded is not None
    for i in range(3):
        loaded.add_message(Message("user", f"追加{i}", old + timedelta(minutes=1, seconds=i), 100))
    await db.save_session(loaded)
    third = await archive_idle_sessions(db, emb, idle_minutes=60, window=4, overlap=1)
    assert third.sessions == ["mention:a"]
    assert third.chunks_added == len(windows(loaded.messages, 11, size=4, overlap=1))
    assert (await db.load_session("mention:a")).last_archived_message_index == 13  # type: ignore[union-attr]


async def test_concurrent_archivers_add_nothing_twice(db: DatabaseProtocol) -> None:
    emb = HashingEmbeddingProvider(dimension=64)
    old = datetime.now(UTC) - timedelta(hours=2)
    for k in range(3):
        await db.save_session(_session(f"mention:{k}", 1, 1, 9, old))
    reports = await asyncio.gather(
        *(archive_idle_sessions(db, emb, idle_minutes=10, window=4, overlap=1) for _ in range(3))
    )
    per_session = len(windows(_session("x", 1, 1, 9, old).messages, 0, size=4, overlap=1))
    assert sum(r.chunks_added for r in reports) == 3 * per_session
    assert (await db.stats()).chunks == 3 * per_session


def _hit(
    i: int,
    *,
    similarity: float | None = None,
    coverage: float | None = None,
    content: str | None = None,
) -> SearchHit:
    return SearchHit(
        chunk_id=i,
        source_id=i,
        content=str(i) if content is None else content,
        score=similarity if similarity is not None else 1.0,
        guild_id=1,
        channel_id=None,
        metadata={},
        similarity=similarity,
        coverage=coverage,
    )


def test_fusion_lets_a_full_keyword_match_beat_the_vector_top_hit() -> None:
    profile = FusionProfile(0.3, 4.0, 1.0, 10, None, None)
    vector = [_hit(1, similarity=0.9), _hit(2, similarity=0.8), _hit(3, similarity=0.5)]
    full = [_hit(3, coverage=1.0), _hit(4, coverage=0.3)]
    fused = fuse(vector, full, profile, top_k=10)
    assert fused[0].hit.chunk_id == 3  # holds every informative term of the query
    assert fused[0].vector_rank == 3 and fused[0].keyword_rank == 1
    assert {r.hit.chunk_id for r in fused} == {1, 2, 3, 4}
    # A keyword hit that shares only a small part of the query does not outvote the
    # vector list's best hit (the failure of rank fusion this replaces).
    partial = [_hit(3, coverage=0.4), _hit(4, coverage=0.3)]
    assert fuse(vector, partial, profile, top_k=10)[0].hit.chunk_id == 1


def test_fused_scores_show_each_half_and_add_up() -> None:
    profile = FusionProfile(0.3, 4.0, 1.0, 10, None, None)
    vector = [_hit(1, similarity=0.9), _hit(2, similarity=0.5)]
    keyword = [_hit(2, coverage=1.0), _hit(3, coverage=0.5)]
    fused = {r.hit.chunk_id: r for r in fuse(vector, keyword, profile, top_k=10)}
    for r in fused.values():
        assert r.score == pytest.approx(r.vector_part + r.keyword_part)
    assert fused[1].keyword_part == 0.0 and fused[1].vector_part == pytest.approx(0.3)
    assert fused[3].vector_part == 0.0 and fused[3].vector_rank is None
    assert fused[2].as_dict()["keyword_part"] == pytest.approx(0.7)


def test_keyword_lead_puts_full_matches_first_in_keyword_order() -> None:
    # Two chunks both hold the code the query names; the vector side prefers the one
    # the keyword side ranks second. With the lead, the keyword side's order decides.
    vector = [_hit(2, similarity=0.9), _hit(5, similarity=0.6), _hit(1, similarity=0.5)]
    keyword = [_hit(1, coverage=1.0), _hit(2, coverage=1.0), _hit(3, coverage=0.4)]
    plain = FusionProfile(0.6, 4.0, 1.0, 10, None, None)
    assert fuse(vector, keyword, plain, top_k=5)[0].hit.chunk_id == 2
    lead = FusionProfile(0.6, 4.0, 1.0, 10, None, None, keyword_lead=0.99)
    fused = fuse(vector, keyword, lead, top_k=5)
    assert [r.hit.chunk_id for r in fused[:2]] == [1, 2]
    # A partial match does not lead; the rest keeps the fused order.
    assert [r.hit.chunk_id for r in fused[2:]] == [5, 3]
    for r in fused:
        assert r.score == pytest.approx(r.vector_part + r.keyword_part)


def test_a_whole_match_in_few_sources_cannot_be_demoted_below_rank_one() -> None:
    # The vector side is sure of chunk 1; the keyword side found the query's code
    # whole in chunk 3 only. With a high vector share the scores put 1 first, the
    # exact-match lead puts 3 first and leaves the rest in fused order.
    vector = [_hit(1, similarity=0.9), _hit(2, similarity=0.8), _hit(3, similarity=0.2)]
    keyword = [_hit(3, coverage=1.0), _hit(2, coverage=0.3)]
    scores_only = FusionProfile(0.9, 4.0, 1.0, 10, None, None)
    plain = [r.hit.chunk_id for r in fuse(vector, keyword, scores_only, top_k=5)]
    assert plain[0] == 1
    led = fuse(vector, keyword, replace(scores_only, exact_lead_sources=3), top_k=5)
    assert [r.hit.chunk_id for r in led] == [3] + [i for i in plain if i != 3]
    assert led[0].score < led[1].score  # the lead is a rule, the scores stay true
    assert led[0].exact_lead and led[0].as_dict()["exact_lead"] is True
    assert not any(r.exact_lead for r in led[1:])


def test_a_whole_match_in_many_sources_or_a_partial_one_does_not_lead() -> None:
    vector = [_hit(1, similarity=0.9), _hit(2, similarity=0.8), _hit(3, similarity=0.2)]
    profile = FusionProfile(0.9, 4.0, 1.0, 10, None, None, exact_lead_sources=2)
    everywhere = [_hit(i, coverage=1.0) for i in (3, 4, 5)]  # three sources > 2
    assert fuse(vector, everywhere, profile, top_k=5)[0].hit.chunk_id == 1
    partial = [_hit(3, coverage=0.9)]
    assert fuse(vector, partial, profile, top_k=5)[0].hit.chunk_id == 1


def test_every_shipped_profile_has_the_exact_match_lead() -> None:
    for profile in (*FUSION_PROFILES.values(), DEFAULT_PROFILE):
        assert profile.exact_lead_sources == EXACT_LEAD_SOURCES > 0
    assert FusionProfile(0.5, 1.0, 1.0, 10, None, None).exact_lead_sources == 0


def test_a_leading_half_keeps_its_own_order_and_the_other_half_fills_behind() -> None:
    # The vector side is sure of chunk 9 (the keyword side never found it); with a high
    # vector share the scores put it first. Leading with the keyword half keeps the
    # keyword order for every keyword hit, and chunk 9 only follows them.
    vector = [_hit(9, similarity=0.95), _hit(2, similarity=0.9), _hit(1, similarity=0.2)]
    keyword = [
        replace(_hit(i, coverage=cov), score=bm25)
        for i, cov, bm25 in ((1, 0.5, 3.0), (2, 0.5, 2.0), (3, 0.2, 1.0))
    ]
    plain = FusionProfile(0.9, 4.0, 1.0, 10, None, None)
    assert [r.hit.chunk_id for r in fuse(vector, keyword, plain, top_k=5)][:2] == [9, 2]
    led = fuse(vector, keyword, replace(plain, leading_half="keyword"), top_k=5)
    assert [r.hit.chunk_id for r in led] == [1, 2, 3, 9]
    assert led[3].score > led[0].score  # the order is the rule; the scores stay fused
    # Leading with the vector half: the vector order, then keyword-only hits.
    by_vector = fuse(vector, keyword, replace(plain, leading_half="vector"), top_k=5)
    assert [r.hit.chunk_id for r in by_vector] == [9, 2, 1, 3]
    # Fewer leading hits than places: the other half fills them, behind the one it has.
    one = fuse(vector, keyword[:1], replace(plain, leading_half="keyword"), top_k=3)
    assert [r.hit.chunk_id for r in one] == [1, 9, 2]
    assert [r.hit.chunk_id for r in fuse(vector, keyword[:1], plain, top_k=3)] == [9, 2, 1]
    # An empty leading half leads nothing: plain fused order.
    empty = fuse(vector, [], replace(plain, leading_half="keyword"), top_k=3)
    assert [r.hit.chunk_id for r in empty] == [9, 2, 1]


def test_scores_equal_to_float_noise_are_one_tie_of_the_leading_half() -> None:
    # 2.0 and 2.0 + 1e-13 are the same BM25 score computed in another order (SQLite
    # and PostgreSQL add in their own orders): a tie, so the fused score orders them.
    keyword = [
        replace(_hit(4, coverage=1.0), score=2.0 + 1e-13),
        replace(_hit(5, coverage=1.0), score=2.0),
    ]
    vector = [_hit(5, similarity=0.8), _hit(4, similarity=0.1)]
    profile = FusionProfile(0.5, 4.0, 1.0, 10, None, None, leading_half="keyword")
    assert [r.hit.chunk_id for r in fuse(vector, keyword, profile, top_k=5)] == [5, 4]
    keyword[0] = replace(keyword[0], score=2.01)  # a real difference keeps its place
    assert [r.hit.chunk_id for r in fuse(vector, keyword, profile, top_k=5)] == [4, 5]


def test_a_misspelt_leading_half_is_refused() -> None:
    with pytest.raises(ValueError, match="leading_half"):
        FusionProfile(0.5, 4.0, 1.0, 10, None, None, leading_half="Keyword")  # type: ignore[arg-type]


def test_a_tie_in_the_leading_half_is_broken_by_the_fused_score() -> None:
    # Chunks 4 and 5 have the same keyword score (the database orders them by id); the
    # vector side prefers 5, so the fused score puts 5 first. A lower keyword score
    # (chunk 6) stays behind both, however similar it is.
    keyword = [
        replace(_hit(4, coverage=1.0), score=2.0),
        replace(_hit(5, coverage=1.0), score=2.0),
        replace(_hit(6, coverage=0.5), score=1.0),
    ]
    vector = [_hit(6, similarity=0.99), _hit(5, similarity=0.8), _hit(4, similarity=0.1)]
    profile = FusionProfile(0.5, 4.0, 1.0, 10, None, None, leading_half="keyword")
    assert [r.hit.chunk_id for r in fuse(vector, keyword, profile, top_k=5)] == [5, 4, 6]


def test_the_exact_match_lead_still_comes_before_a_leading_half() -> None:
    vector = [_hit(1, similarity=0.9), _hit(2, similarity=0.8), _hit(3, similarity=0.2)]
    keyword = [_hit(3, coverage=1.0), _hit(2, coverage=0.3)]
    profile = FusionProfile(0.9, 4.0, 1.0, 10, None, None, exact_lead_sources=3)
    led = fuse(vector, keyword, replace(profile, leading_half="vector"), top_k=5)
    assert [r.hit.chunk_id for r in led] == [3, 1, 2]
    assert led[0].exact_lead


async def test_hybrid_ranks_the_same_on_both_backends_with_each_leading_half(
    new_database_url: Any, settings: Settings
) -> None:
    """One ``fuse`` over each backend's halves: the same sources, order and scores."""
    corpus = Path(__file__).parents[2] / "examples" / "corpus"
    queries = (
        "LT-1042",
        "how do I grow herbs on a balcony",
        "眠れない夜の対処法",
        "When does the book club meet?",
        "灯台の会議の締切",
    )
    emb = HashingEmbeddingProvider()
    results = []
    all_scores: list[list[list[float]]] = []
    for kind in ("sqlite", "postgres"):
        async with open_database(await new_database_url(kind), settings=settings) as backend:
            await ingest_paths(backend, emb, [corpus], guild_id=1)
            found = []
            scores: list[list[float]] = []
            for q in queries:
                shipped = await search_knowledge(backend, emb, q, guild_id=1, top_k=8, floor=False)
                found.append([_ranked(r) for r in shipped.hits])
                scores.append([r.score for r in shipped.hits])
                qvec = (await emb.embed_queries([q]))[0]
                vector = await backend.similarity_search(qvec, guild_id=1, top_k=20)
                keyword = await backend.keyword_search(q, guild_id=1, top_k=20)
                for half in (None, "keyword", "vector"):
                    profile = replace(FUSION_PROFILES[emb.model], leading_half=half)
                    fused = fuse(vector, keyword, profile, top_k=8, query_language=0.0)
                    found.append([_ranked(r) for r in fused])
                    scores.append([r.score for r in fused])
            results.append(found)
            all_scores.append(scores)
    assert results[0] == results[1]
    assert all(results[0])
    # Scores agree to float noise (float32 cosine in numpy vs pgvector; BM25 in two
    # engines), not to the last bit.
    for sqlite_scores, pg_scores in zip(*all_scores, strict=True):
        assert sqlite_scores == pytest.approx(pg_scores, abs=1e-6)


def _ranked(r: RankedHit) -> tuple[str, int, int | None, int | None]:
    return (r.hit.source_uri, r.hit.chunk_index, r.vector_rank, r.keyword_rank)


def test_language_bonus_lifts_a_hit_in_the_other_language_only_when_asked() -> None:
    # An English question; the Japanese chunk answers it but the model ranks an English
    # chunk a little higher (its same-language preference).
    vector = [
        _hit(1, similarity=0.45, content="How much will it cost? 9.99 dollars."),
        _hit(2, similarity=0.44, content="Tシャツの価格は3,500円です。"),
        _hit(3, similarity=0.20, content="Unrelated notes about the build machine."),
    ]
    plain = FusionProfile(0.5, 4.0, 1.0, 10, None, None)
    assert fuse(vector, [], plain, top_k=3, query_language=0.0)[0].hit.chunk_id == 1
    bonus = FusionProfile(0.5, 4.0, 1.0, 10, None, None, language_bonus=0.4)
    assert fuse(vector, [], bonus, top_k=3, query_language=0.0)[0].hit.chunk_id == 2
    # A Japanese question keeps the English chunk's lead; no query language, no bonus.
    assert fuse(vector, [], bonus, top_k=3, query_language=1.0)[0].hit.chunk_id == 1
    assert fuse(vector, [], bonus, top_k=3)[0].hit.chunk_id == 1


async def test_the_floor_keeps_what_it_dropped_and_why(db: DatabaseProtocol, corpus: Path) -> None:
    emb = HashingEmbeddingProvider(dimension=256)
    await ingest_paths(db, emb, [corpus], guild_id=1)
    answered = await search_knowledge(db, emb, "ZX-81", guild_id=1)
    assert answered.hits and not answered.dropped
    assert answered.floor is not None and answered.floor.passed
    assert answered.floor.best_coverage == pytest.approx(1.0)
    turned_away = await search_knowledge(
        db, emb, "ZX-81", guild_id=1, min_similarity=1.01, min_coverage=1.01
    )
    assert not turned_away.hits and turned_away.dropped
    assert turned_away.dropped[0].hit.source_uri.endswith("zeta.md")
    floor = turned_away.floor
    assert floor is not None and not floor.passed and floor.min_coverage == 1.01
    assert floor.as_dict()["best_coverage"] == pytest.approx(1.0)


def test_relevance_floor_needs_one_side_to_vouch() -> None:
    profile = FusionProfile(0.3, 4.0, 1.0, 10, 0.5, 1.0)
    weak = [_hit(1, similarity=0.4)]
    assert nothing_relevant(weak, [_hit(2, coverage=0.6)], profile)
    assert not nothing_relevant([_hit(1, similarity=0.55)], [], profile)
    assert not nothing_relevant(weak, [_hit(2, coverage=1.0)], profile)
    assert nothing_relevant([], [], profile)
    no_floor = FusionProfile(0.3, 4.0, 1.0, 10, None, None)
    assert not nothing_relevant(weak, [], no_floor)


async def test_archiving_after_forget_keeps_new_messages(db: DatabaseProtocol) -> None:
    """forget() renumbers a session; the next archive must not skip the new windows."""
    emb = HashingEmbeddingProvider(dimension=64)
    old = datetime.now(UTC) - timedelta(hours=3)
    s = ChatSession(
        "mention:f", "mention", guild_id=4, channel_id=4, created_at=old, last_active_at=old
    )
    for i in range(4):
        s.add_message(
            Message("user", f"消したい話 {i}", old + timedelta(seconds=i), 42, "forgetme")
        )
    for i in range(4):
        s.add_message(Message("user", f"残る話 {i}", old + timedelta(seconds=10 + i), 43, "stay"))
    await db.save_session(s)
    first = await archive_idle_sessions(db, emb, idle_minutes=60, window=4, overlap=0)
    assert first.chunks_added == 2
    await db.forget(guild_id=4, user_id=42)
    loaded = await db.load_session("mention:f")
    assert loaded is not None and len(loaded.messages) == 4
    for i in range(4):
        loaded.add_message(
            Message("user", f"新しい話 {i}", old + timedelta(seconds=20 + i), 43, "stay")
        )
    await db.save_session(loaded)
    report = await archive_idle_sessions(db, emb, idle_minutes=60, window=4, overlap=0)
    assert report.chunks_added >= 1
    hits = await search_knowledge(db, emb, "新しい話", guild_id=4, mode="keyword", top_k=10)
    assert any("新しい話 3" in h.hit.content for h in hits.hits)
    assert not any("消したい話" in h.hit.content for h in hits.hits)


async def test_archived_windows_record_their_messages_and_rearchive_without_a_deleted_one(
    db: DatabaseProtocol,
) -> None:
    emb = HashingEmbeddingProvider(dimension=64)
    old = datetime.now(UTC) - timedelta(hours=3)
    s = ChatSession("thread:77", "thread", guild_id=5, channel_id=6, thread_id=77)
    for i in range(8):
        s.add_message(
            Message(
                "user", f"話題{i} の内容", old + timedelta(seconds=i), 40 + i % 2, None, 900 + i
            )
        )
    s.last_active_at = old + timedelta(seconds=8)
    await db.set_embedding_config(embedding_config(emb))
    # An in-memory copy (no stored ids): archiving reloads it so provenance is complete.
    await db.save_session(s)
    assert await archive_session(db, emb, s, window=4, overlap=1) == 3
    source = await db.find_source(5, "session:thread:77")
    assert source is not None and source.source_id is not None
    stored = await db.load_session("thread:77")
    assert stored is not None
    ids = [m.stored_id for m in stored.messages]
    chunks = await db.list_chunks(source.source_id)
    assert [c.message_ids for c in chunks] == [tuple(ids[0:4]), tuple(ids[3:7]), tuple(ids[6:8])]

    change = await db.delete_messages(guild_id=5, discord_message_ids=[905])
    assert change.chunks == 1
    added = await rearchive(
        db, emb, "thread:77", change.rearchive["thread:77"], window=4, overlap=1
    )
    assert added >= 1
    texts = [c.content for c in await db.list_chunks(source.source_id)]
    assert not any("話題5" in t for t in texts)
    # Every remaining message is still in some window.
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert any(f"話題{i} " in t for t in texts), i
    hits = await search_knowledge(db, emb, "話題4", guild_id=5, mode="keyword", top_k=10)
    assert any("話題4" in h.hit.content for h in hits.hits)


async def test_pdf_and_text_files_share_one_entry_point(
    db: DatabaseProtocol, tmp_path: Path
) -> None:
    from kotonoha_bot.knowledge.ingest import IngestReport, ingest_bytes
    from tests.fakes.pdf import make_pdf

    emb = HashingEmbeddingProvider(dimension=64)
    folder = tmp_path / "docs"
    folder.mkdir()
    pdf = make_pdf(["Library hours\nThe library closes at five.", "The cafe is on floor two."])
    (folder / "guide.pdf").write_bytes(pdf)
    (folder / "scan.pdf").write_bytes(make_pdf([], blank_pages=2))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    write(folder, "notes.md", "# Notes\nThe printer is in room 3.\n")
    report = await ingest_paths(db, emb, [folder], guild_id=1)
    assert sorted(Path(p).name for p in report.added) == ["guide.pdf", "notes.md"]
    reasons = {Path(p).name: r for p, r in report.failed}
    assert "no text layer" in reasons["scan.pdf"]
    assert "not a readable PDF" in reasons["broken.pdf"]
    hits = await search_knowledge(db, emb, "library closes", guild_id=1, mode="keyword", top_k=3)
    assert hits.hits and "closes at five" in hits.hits[0].hit.content
    # The same bytes arriving another way (a Discord attachment) follow the same rules.
    uri = next(p for p in report.added if p.endswith("guide.pdf"))
    again = IngestReport()
    assert await ingest_bytes(db, emb, uri=uri, data=pdf, guild_id=1, report=again) == "unchanged"
    # Shift_JIS bytes (a Windows user's attachment) follow the same encoding rule as files.
    sjis = "会議は三時から".encode("cp932")
    assert await ingest_bytes(db, emb, uri="x.txt", data=sjis, guild_id=1, report=again)
    assert again.notes == [("x.txt", "decoded as Shift_JIS (CP932)")]
    hits = await search_knowledge(db, emb, "会議", guild_id=1, mode="keyword", top_k=3)
    assert any("会議は三時から" in h.hit.content for h in hits.hits)
