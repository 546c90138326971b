"""The storage contract: every test here runs on SQLite and on PostgreSQL.

No test looks at the backend's name; the ``db`` fixture is parametrized in
tests/conftest.py. Ground truths are computed independently with numpy.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.errors import (
    DimensionMismatchError,
    EmbeddingModelMismatchError,
    InvalidInputError,
    InvalidTextError,
    InvalidVectorError,
    NotFoundError,
    SessionConflictError,
)
from kotonoha_bot.models import (
    ChatSession,
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Message,
)

BIG_ID = 1234567890123456789
DIM = 8


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def chunk(key: str, text: str, vec: np.ndarray | None, **kw: object) -> KnowledgeChunk:
    return KnowledgeChunk(chunk_key=key, content=text, embedding=vec, **kw)  # type: ignore[arg-type]


async def counts(db: DatabaseProtocol) -> tuple[int, int, int, int]:
    s = await db.stats()
    return s.sessions, s.messages, s.sources, s.chunks


# --- sessions ------------------------------------------------------------------------


async def test_session_round_trip_keeps_text_ids_and_times(db: DatabaseProtocol) -> None:
    ts = datetime(2026, 1, 16, 9, 30, 15, 123456, tzinfo=UTC)
    session = ChatSession(
        session_key=f"thread:{BIG_ID}",
        session_type="thread",
        guild_id=BIG_ID,
        channel_id=BIG_ID - 1,
        thread_id=BIG_ID,
        user_id=2**63 - 1,
        created_at=ts,
        last_active_at=ts,
    )
    session.add_message(
        Message(
            "user",
            "こんにちは、ことのは！🌸 今日の会議は？",
            ts,
            author_id=BIG_ID,
            author_name="さくら",
        )
    )
    session.add_message(Message("assistant", "Hello 👋 — 15時からです。\n改行も。", ts))
    await db.save_session(session)
    assert session.version == 1

    loaded = await db.load_session(session.session_key)
    assert loaded is not None
    assert loaded.guild_id == BIG_ID and loaded.channel_id == BIG_ID - 1
    assert loaded.thread_id == BIG_ID and loaded.user_id == 2**63 - 1
    assert [m.content for m in loaded.messages] == [m.content for m in session.messages]
    assert loaded.messages[0].author_id == BIG_ID
    assert loaded.messages[0].author_name == "さくら"
    assert loaded.messages[0].timestamp == ts
    assert loaded.messages[0].timestamp.tzinfo is not None
    assert loaded.created_at == ts
    assert loaded.version == 1
    assert loaded.session_type == "thread"
    assert await db.load_session("nope") is None


async def test_appending_adds_only_new_messages(db: DatabaseProtocol) -> None:
    session = ChatSession("mention:1", "mention", guild_id=1, channel_id=2, user_id=3)
    for i in range(3):
        session.add_message(Message("user", f"m{i}"))
    await db.save_session(session)
    session.add_message(Message("assistant", "m3"))
    await db.save_session(session)
    assert session.version == 2
    loaded = await db.load_session("mention:1")
    assert loaded is not None
    assert [m.content for m in loaded.messages] == ["m0", "m1", "m2", "m3"]
    assert (await db.stats()).messages == 4
    # Removing history through save_session is refused, nothing changes.
    loaded.messages.pop()
    with pytest.raises(InvalidInputError):
        await db.save_session(loaded)
    again = await db.load_session("mention:1")
    assert again is not None and len(again.messages) == 4 and again.version == 2


async def test_concurrent_writers_one_wins_no_message_lost(db: DatabaseProtocol) -> None:
    base = ChatSession("eavesdrop:9", "eavesdrop", guild_id=1, channel_id=9)
    base.add_message(Message("user", "start"))
    await db.save_session(base)

    a = await db.load_session("eavesdrop:9")
    b = await db.load_session("eavesdrop:9")
    assert a is not None and b is not None
    a.add_message(Message("user", "from A"))
    b.add_message(Message("user", "from B"))
    results = await asyncio.gather(db.save_session(a), db.save_session(b), return_exceptions=True)
    conflicts = [r for r in results if isinstance(r, SessionConflictError)]
    assert len(conflicts) == 1 and results.count(None) == 1
    loser_msg = "from B" if isinstance(results[1], SessionConflictError) else "from A"

    # The loser resolves by reload-and-append.
    fresh = await db.load_session("eavesdrop:9")
    assert fresh is not None
    fresh.add_message(Message("user", loser_msg))
    await db.save_session(fresh)
    final = await db.load_session("eavesdrop:9")
    assert final is not None
    assert sorted(m.content for m in final.messages) == ["from A", "from B", "start"]
    assert final.version == 3


async def test_creating_an_existing_session_conflicts(db: DatabaseProtocol) -> None:
    await db.save_session(ChatSession("dm:5", "dm", channel_id=5))
    with pytest.raises(SessionConflictError):
        await db.save_session(ChatSession("dm:5", "dm", channel_id=5))
    stale = ChatSession("dm:6", "dm", version=3)
    with pytest.raises(SessionConflictError):
        await db.save_session(stale)
    assert await db.load_session("dm:6") is None


async def test_delete_and_list_sessions(db: DatabaseProtocol) -> None:
    old = datetime.now(UTC) - timedelta(hours=3)
    s1 = ChatSession("mention:1", "mention", guild_id=7, created_at=old, last_active_at=old)
    s2 = ChatSession("mention:2", "mention", guild_id=7)
    s3 = ChatSession("mention:3", "mention", guild_id=8)
    for s in (s1, s2, s3):
        s.add_message(Message("user", "hi", s.last_active_at))
        await db.save_session(s)
    idle = await db.list_sessions(idle_before=datetime.now(UTC) - timedelta(hours=1))
    assert [i.session_key for i in idle] == ["mention:1"]
    assert idle[0].message_count == 1
    assert {i.session_key for i in await db.list_sessions(guild_id=7)} == {"mention:1", "mention:2"}
    assert await db.delete_session("mention:1") is True
    assert await db.delete_session("mention:1") is False
    assert await db.load_session("mention:1") is None
    assert (await db.stats()).messages == 2


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda s: s.add_message(Message("user", "bad\x00text")), InvalidTextError),
        (lambda s: s.add_message(Message("robot", "x")), InvalidInputError),  # type: ignore[arg-type]
        (lambda s: setattr(s, "session_type", "group"), InvalidInputError),
        (lambda s: setattr(s, "guild_id", 2**64), InvalidInputError),
        (
            lambda s: s.messages.append(Message("user", "naive", datetime(2026, 1, 1))),
            InvalidInputError,
        ),
    ],
)
async def test_bad_sessions_are_rejected_and_nothing_written(
    db: DatabaseProtocol, mutate: object, error: type[Exception]
) -> None:
    session = ChatSession("mention:77", "mention", guild_id=1)
    session.add_message(Message("user", "fine"))
    mutate(session)  # type: ignore[operator]
    with pytest.raises(error):
        await db.save_session(session)
    assert await db.load_session("mention:77") is None
    assert await counts(db) == (0, 0, 0, 0)
    assert session.version == 0


# --- embedding configuration ---------------------------------------------------------


async def test_embedding_config_recorded_once_and_enforced(db: DatabaseProtocol) -> None:
    assert await db.get_embedding_config() is None
    await db.set_embedding_config(EmbeddingConfig("model-a", DIM))
    await db.set_embedding_config(EmbeddingConfig("model-a", DIM))  # same: no-op
    with pytest.raises(EmbeddingModelMismatchError) as info:
        await db.set_embedding_config(EmbeddingConfig("model-b", 16))
    assert "model-a" in str(info.value) and "model-b" in str(info.value)
    assert str(DIM) in str(info.value) and "16" in str(info.value)
    assert await db.get_embedding_config() == EmbeddingConfig("model-a", DIM)


async def test_vectors_before_config_are_refused(db: DatabaseProtocol) -> None:
    src = KnowledgeSource(guild_id=1, uri="doc", title="Doc")
    with pytest.raises(InvalidInputError):
        await db.save_source(src, [chunk("a", "text", np.ones(DIM, np.float32))])
    assert await counts(db) == (0, 0, 0, 0)
    assert await db.similarity_search(np.ones(DIM), guild_id=1) == []


# --- knowledge -----------------------------------------------------------------------


async def test_similarity_search_matches_numpy_ground_truth(db: DatabaseProtocol) -> None:
    # 1,500 rows: a scope every backend searches exactly by default (PostgreSQL scans up
    # to ~4 ms of rows exactly, 1,527 at 1536 dims; larger scopes go through its index,
    # whose recall floors are in tests/db/test_postgres.py).
    rng = np.random.default_rng(7)
    dim, n = 1536, 1500
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    await db.set_embedding_config(EmbeddingConfig("test", dim))
    ids: list[int] = []
    for start in range(0, n, 1500):
        saved = await db.save_source(
            KnowledgeSource(guild_id=BIG_ID, uri=f"bulk-{start}", title=f"bulk {start}"),
            [
                chunk(f"k{i}", f"chunk {i}", vectors[i], chunk_index=i)
                for i in range(start, start + 1500)
            ],
        )
        assert saved.source_id is not None
        ids += [c.chunk_id for c in await db.list_chunks(saved.source_id)]  # type: ignore[misc]
    normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for q in range(3):
        query = rng.standard_normal(dim).astype(np.float32)
        sims = normed.astype(np.float64) @ (query / np.linalg.norm(query)).astype(np.float64)
        truth = np.argsort(-sims)[:10]
        hits = await db.similarity_search(query, guild_id=BIG_ID, top_k=10)
        assert [h.chunk_id for h in hits] == [ids[i] for i in truth], f"query {q}"
        np.testing.assert_allclose([h.similarity for h in hits], sims[truth], atol=1e-4)
        assert all(h.guild_id == BIG_ID for h in hits)
        assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)


async def test_vectors_round_trip_bit_exact(db: DatabaseProtocol) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((5, DIM)).astype(np.float32)
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    saved = await db.save_source(
        KnowledgeSource(guild_id=1, uri="u", title="t"),
        [chunk(f"k{i}", f"c{i}", vecs[i], chunk_index=i) for i in range(5)],
    )
    assert saved.status == "ready"
    stored = await db.list_chunks(saved.source_id)  # type: ignore[arg-type]
    for i, c in enumerate(stored):
        assert c.embedding is not None
        assert c.embedding.dtype == np.float32
        assert c.embedding.tobytes() == vecs[i].tobytes()


async def test_guild_scope_is_never_crossed(db: DatabaseProtocol) -> None:
    rng = np.random.default_rng(3)
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    query = unit(rng, 1)[0]
    far = unit(rng, 5)
    # Guild B holds exact copies of the query; guild A only unrelated vectors.
    await db.save_source(
        KnowledgeSource(guild_id=100, uri="a", title="A"),
        [chunk(f"a{i}", f"guild A {i} 東京", far[i]) for i in range(5)],
    )
    await db.save_source(
        KnowledgeSource(guild_id=200, uri="b", title="B"),
        [chunk(f"b{i}", f"guild B secret {i} 東京", query) for i in range(5)],
    )
    hits = await db.similarity_search(query, guild_id=100, top_k=10)
    assert len(hits) == 5 and {h.guild_id for h in hits} == {100}
    assert all("secret" not in h.content for h in hits)
    kw = await db.keyword_search("東京 secret", guild_id=100, top_k=10)
    assert kw and {h.guild_id for h in kw} == {100}
    assert await db.similarity_search(query, guild_id=300) == []


async def test_channel_narrowing(db: DatabaseProtocol) -> None:
    rng = np.random.default_rng(4)
    vecs = unit(rng, 30)
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    for ch in (1, 2, 3):
        await db.save_source(
            KnowledgeSource(guild_id=9, channel_id=ch, uri=f"ch{ch}", title=f"c{ch}"),
            [chunk(f"k{i}", f"text {i}", vecs[(ch - 1) * 10 + i]) for i in range(10)],
        )
    hits = await db.similarity_search(vecs[0], guild_id=9, channel_id=2, top_k=20)
    assert len(hits) == 10 and {h.channel_id for h in hits} == {2}
    sims = vecs[10:20] @ vecs[0]
    np.testing.assert_allclose([h.similarity for h in hits], np.sort(sims)[::-1], atol=1e-5)
    assert len(await db.similarity_search(vecs[0], guild_id=9, top_k=100)) == 30
    kw = await db.keyword_search("text", guild_id=9, channel_id=3, top_k=50)
    assert len(kw) == 10 and {h.channel_id for h in kw} == {3}


async def test_metadata_filters_equality_and_in(db: DatabaseProtocol) -> None:
    rng = np.random.default_rng(5)
    vecs = unit(rng, 6)
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    metas = [
        {"lang": "ja", "year": 2025},
        {"lang": "en", "year": 2025},
        {"lang": "ja", "year": 2026},
        {"lang": "fr", "year": "2026"},
        {"lang": "en", "pinned": True},
        {},
    ]
    await db.save_source(
        KnowledgeSource(guild_id=1, uri="m", title="M"),
        [chunk(f"k{i}", f"note {i}", vecs[i], metadata=metas[i], chunk_index=i) for i in range(6)],
    )

    async def idx(**filters: object) -> set[int]:
        hits = await db.similarity_search(vecs[0], guild_id=1, top_k=10, filters=filters)
        kw = await db.keyword_search("note", guild_id=1, top_k=10, filters=filters)
        assert {h.chunk_index for h in hits} == {h.chunk_index for h in kw}
        return {h.chunk_index for h in hits}

    assert await idx(lang="ja") == {0, 2}
    assert await idx(lang=["en", "fr"]) == {1, 3, 4}
    assert await idx(lang="ja", year=2026) == {2}
    assert await idx(year=2026) == {2}  # the string "2026" is not the number 2026
    assert await idx(year="2026") == {3}
    assert await idx(pinned=True) == {4}
    assert await idx(missing="x") == set()
    with pytest.raises(InvalidInputError):
        await db.similarity_search(vecs[0], guild_id=1, filters={"bad key'": 1})
    with pytest.raises(InvalidInputError):
        await db.similarity_search(vecs[0], guild_id=1, filters={"lang": []})


async def test_min_similarity_and_top_k(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", 2))
    vecs = [np.array(v, np.float32) for v in ([1, 0], [1, 1], [0, 1], [-1, 0])]
    await db.save_source(
        KnowledgeSource(guild_id=1, uri="s", title="S"),
        [chunk(f"k{i}", f"c{i}", v, chunk_index=i) for i, v in enumerate(vecs)],
    )
    hits = await db.similarity_search([1, 0], guild_id=1, top_k=10, min_similarity=0.5)
    assert [h.chunk_index for h in hits] == [0, 1]
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert hits[1].similarity == pytest.approx(2**-0.5, abs=1e-6)
    assert len(await db.similarity_search([1, 0], guild_id=1, top_k=3)) == 3
    with pytest.raises(InvalidInputError):
        await db.similarity_search([1, 0], guild_id=1, top_k=0)


@pytest.mark.parametrize(
    ("vector", "error"),
    [
        (np.ones(DIM + 1, np.float32), DimensionMismatchError),
        (np.array([np.nan] + [1.0] * (DIM - 1), np.float32), InvalidVectorError),
        (np.array([np.inf] + [1.0] * (DIM - 1), np.float32), InvalidVectorError),
        (np.zeros(DIM, np.float32), InvalidVectorError),
    ],
)
async def test_bad_vectors_rejected_nothing_written(
    db: DatabaseProtocol, vector: np.ndarray, error: type[Exception]
) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    good = KnowledgeSource(guild_id=1, uri="good", title="Good")
    await db.save_source(good, [chunk("g", "good chunk", np.ones(DIM, np.float32))])
    before = await counts(db)
    with pytest.raises(error) as info:
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="bad", title="Bad"),
            [chunk("ok", "fine", np.ones(DIM, np.float32)), chunk("bad", "broken", vector)],
        )
    if error is DimensionMismatchError:
        assert str(DIM) in str(info.value) and str(DIM + 1) in str(info.value)
    assert await counts(db) == before
    assert await db.find_source(1, "bad") is None
    with pytest.raises(error):
        await db.similarity_search(vector, guild_id=1)


async def test_nul_in_chunk_text_rejected(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    with pytest.raises(InvalidTextError):
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="n", title="N"),
            [chunk("a", "fine", None), chunk("b", "nul\x00here", None)],
        )
    with pytest.raises(InvalidTextError):
        await db.save_source(KnowledgeSource(guild_id=1, uri="t\x00", title="T"), [])
    with pytest.raises(InvalidInputError):
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="m", title="M", metadata={"k": "a\x00b"}), []
        )
    assert await counts(db) == (0, 0, 0, 0)


async def test_keyword_search_japanese_and_english(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    texts = [
        "来週の会議は東京で行います。",
        "京都の紅葉がきれいでした。",
        "The PostgreSQL migration is scheduled for Friday.",
        "猫が好きです。",
        "会議室の予約を忘れずに。東京タワーの近くです。",
    ]
    await db.save_source(
        KnowledgeSource(guild_id=1, uri="kw", title="KW"),
        [chunk(f"k{i}", t, None, chunk_index=i) for i, t in enumerate(texts)],
    )

    async def found(q: str) -> list[int]:
        return [h.chunk_index for h in await db.keyword_search(q, guild_id=1, top_k=10)]

    assert set(await found("東京")) == {0, 4}
    assert set(await found("会議")) == {0, 4}
    assert await found("京都") == [1]
    assert await found("postgresql") == [2]
    assert await found("Migration") == [2]
    assert await found("猫") == [3]
    both = await found("東京の会議")
    assert set(both[:2]) == {0, 4}
    assert await found("存在しない単語") == []
    assert await found("   ") == []
    hits = await db.keyword_search("会議", guild_id=1)
    assert all(h.score > 0 and h.similarity is None for h in hits)
    assert hits[0].source_title == "KW" and hits[0].source_uri == "kw"


async def test_keyword_search_drops_terms_that_carry_no_information(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    texts = [
        "How to reset the game: open the game menu.",
        "The game saves on the lighthouse stairs.",
        "Our game jam starts on Friday.",
        "Game night is every Sunday with the book club.",
        "The kujira build machine ran out of disk space.",
    ]
    await db.save_source(
        KnowledgeSource(guild_id=1, uri="info", title="Info"),
        [chunk(f"i{i}", t, None, chunk_index=i) for i, t in enumerate(texts)],
    )

    async def found(q: str) -> list[int]:
        return [h.chunk_index for h in await db.keyword_search(q, guild_id=1, top_k=10)]

    # "how", "to", "the", "on" are stop words and "game" is in 4 of 5 chunks: only
    # "kujira" and "disk" carry information, so nothing else is dragged in.
    assert await found("how to fix the game on kujira disk") == [4]
    assert await found("how to the on") == []
    # Only common words: the rarest one is kept, so a one-word search still finds rows.
    assert set(await found("game")) == {0, 1, 2, 3}
    hits = await db.keyword_search("kujira lighthouse", guild_id=1)
    assert {h.chunk_index for h in hits} == {1, 4}
    assert all(h.coverage is not None and 0 < h.coverage < 1 for h in hits)
    full = await db.keyword_search("kujira disk", guild_id=1)
    assert full[0].chunk_index == 4 and full[0].coverage == pytest.approx(1.0)
    # A term no chunk holds counts against coverage: "refund" is not answered here.
    partial = await db.keyword_search("kujira refund", guild_id=1)
    assert partial[0].chunk_index == 4 and partial[0].coverage == pytest.approx(0.5, abs=0.2)


async def test_keyword_search_ranks_the_same_on_both_backends(
    new_database_url: Any, settings: Settings
) -> None:
    """One shared rule (kotonoha_bot.text): same hits, order, scores and coverage."""
    rng = np.random.default_rng(3)
    words = ["lantern", "tide", "harbour", "cello", "waltz"]
    words += ["kujira", "nightly", "build", "shells", "mirror"]
    ja = ["灯台", "会議", "東京", "締切", "翻訳", "港町", "体験版", "台詞"]
    texts = []
    for i in range(60):
        picked = rng.choice(words, size=int(rng.integers(3, 9))).tolist()
        texts.append(
            " ".join(picked)
            + " "
            + "の".join(rng.choice(ja, size=3).tolist())
            + f" LT-{1000 + i % 7}"
        )
    results = []
    for kind in ("sqlite", "postgres"):
        async with open_database(await new_database_url(kind), settings=settings) as backend:
            await backend.set_embedding_config(EmbeddingConfig("t", DIM))
            await backend.save_source(
                KnowledgeSource(guild_id=1, uri="p", title="P"),
                [chunk(f"p{i}", t, None, chunk_index=i) for i, t in enumerate(texts)],
            )
            await backend.save_source(  # another guild's rows never enter the statistics
                KnowledgeSource(guild_id=2, uri="q", title="Q"),
                [
                    chunk(f"q{i}", "kujira kujira 灯台 LT-1003", None, chunk_index=i)
                    for i in range(40)
                ],
            )
            found = []
            for q in (
                "LT-1005 cello",
                "灯台の会議",
                "What is the LT-1002 deadline?",
                "LT-1003",
                "翻訳の締切",
            ):
                hits = await backend.keyword_search(q, guild_id=1, top_k=15)
                found.append(
                    [(h.chunk_index, round(h.score, 9), round(h.coverage or 0, 9)) for h in hits]
                )
            results.append(found)
    assert results[0] == results[1]
    assert all(results[0])


async def test_save_source_replaces_and_delete_cascades(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    rng = np.random.default_rng(8)
    v = unit(rng, 3)
    src = KnowledgeSource(guild_id=1, uri="docs/a.md", title="A", content_hash="h1")
    first = await db.save_source(src, [chunk("1", "old one", v[0]), chunk("2", "old two", v[1])])
    second = await db.save_source(
        KnowledgeSource(guild_id=1, uri="docs/a.md", title="A2", content_hash="h2"),
        [chunk("3", "new three", v[2])],
    )
    assert second.source_id == first.source_id
    found = await db.find_source(1, "docs/a.md")
    assert found is not None and found.title == "A2" and found.content_hash == "h2"
    assert [c.content for c in await db.list_chunks(first.source_id)] == ["new three"]  # type: ignore[arg-type]
    assert [h.content for h in await db.similarity_search(v[0], guild_id=1)] == ["new three"]
    assert await db.keyword_search("old", guild_id=1) == []
    assert await db.delete_source(first.source_id) is True  # type: ignore[arg-type]
    assert await db.similarity_search(v[2], guild_id=1) == []
    assert await db.keyword_search("three", guild_id=1) == []
    assert await counts(db) == (0, 0, 0, 0)
    assert await db.delete_source(first.source_id) is False  # type: ignore[arg-type]


async def test_add_chunks_is_idempotent(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    v = unit(np.random.default_rng(9), 3)
    src = await db.save_source(
        KnowledgeSource(guild_id=5, uri="session:x", title="conv", source_type="conversation"),
        [],
    )
    assert src.source_id is not None
    added = await db.add_chunks(src.source_id, [chunk("w0", "a", v[0]), chunk("w1", "b", v[1])])
    assert added == 2
    again = await db.add_chunks(
        src.source_id, [chunk("w0", "a", v[0]), chunk("w1", "b", v[1]), chunk("w2", "c", v[2])]
    )
    assert again == 1
    assert len(await db.list_chunks(src.source_id)) == 3
    assert len(await db.similarity_search(v[0], guild_id=5)) == 3
    with pytest.raises(NotFoundError):
        await db.add_chunks(999999, [chunk("z", "z", v[0])])
    with pytest.raises(InvalidInputError):
        await db.add_chunks(src.source_id, [chunk("x", "x", v[0], guild_id=6)])


async def test_pending_chunks_then_embeddings_make_source_ready(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    src = await db.save_source(
        KnowledgeSource(guild_id=1, uri="p", title="P"),
        [chunk(f"k{i}", f"pending {i}", None, chunk_index=i) for i in range(3)],
    )
    assert src.status == "pending"
    assert (await db.stats()).pending_chunks == 3
    todo = await db.pending_chunks(10)
    assert [p.content for p in todo] == ["pending 0", "pending 1", "pending 2"]
    assert await db.similarity_search(np.ones(DIM), guild_id=1) == []
    v = unit(np.random.default_rng(2), 3)
    with pytest.raises(DimensionMismatchError):
        await db.set_chunk_embeddings([(todo[0].chunk_id, np.ones(DIM + 2, np.float32))])
    assert await db.set_chunk_embeddings([(todo[0].chunk_id, v[0])]) == 1
    assert (await db.get_source(src.source_id)).status == "pending"  # type: ignore[arg-type,union-attr]
    await db.set_chunk_embeddings([(p.chunk_id, v[i + 1]) for i, p in enumerate(todo[1:])])
    assert (await db.get_source(src.source_id)).status == "ready"  # type: ignore[arg-type,union-attr]
    assert (await db.stats()).pending_chunks == 0
    hits = await db.similarity_search(v[1], guild_id=1)
    assert hits[0].content == "pending 1"
    # Keyword search works on pending rows too (no vector needed).
    assert len(await db.keyword_search("pending", guild_id=1)) == 3


async def test_row_limits_mean_the_same_on_both_backends(db: DatabaseProtocol) -> None:
    """0 lists nothing, n lists n, a negative or non-integer limit is a typed error.

    (SQLite alone would read ``LIMIT -1`` as "no limit"; PostgreSQL refuses it.)
    """
    for i in range(3):
        await db.save_session(ChatSession(f"dm:{i}", "dm", user_id=i))
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    await db.save_source(
        KnowledgeSource(guild_id=1, uri="l", title="L"),
        [chunk(f"k{i}", f"limit {i}", None, chunk_index=i) for i in range(3)],
    )
    assert await db.list_sessions(limit=0) == []
    assert len(await db.list_sessions(limit=2)) == 2
    assert len(await db.list_sessions()) == 3
    assert await db.pending_chunks(0) == []
    await db.begin_reembed(EmbeddingConfig("next", 4))
    assert await db.reembed_todo(0) == []
    assert len(await db.reembed_todo(2)) == 2
    for bad in (-1, True, 1.5):
        with pytest.raises(InvalidInputError, match="limit"):
            await db.list_sessions(limit=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="limit"):
            await db.pending_chunks(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="limit"):
            await db.reembed_todo(bad)  # type: ignore[arg-type]
    assert len(await db.pending_chunks(2)) == 2


async def test_reembed_switches_dimension_and_search_keeps_working(db: DatabaseProtocol) -> None:
    rng = np.random.default_rng(11)
    old = unit(rng, 4, DIM)
    new = unit(rng, 4, 4)
    await db.set_embedding_config(EmbeddingConfig("old", DIM))
    await db.save_source(
        KnowledgeSource(guild_id=1, uri="r", title="R"),
        [chunk(f"k{i}", f"text {i}", old[i], chunk_index=i) for i in range(4)],
    )
    await db.begin_reembed(EmbeddingConfig("new", 4))
    todo = await db.reembed_todo(2)
    assert len(todo) == 2
    await db.store_reembed([(t.chunk_id, new[int(t.content[-1])]) for t in todo])
    status = await db.reembed_status()
    assert status is not None and (status.done, status.total) == (2, 4)
    # Old vectors still serve, and the switch is refused while incomplete.
    assert (await db.similarity_search(old[3], guild_id=1))[0].content == "text 3"
    with pytest.raises(InvalidInputError):
        await db.finish_reembed()
    with pytest.raises(DimensionMismatchError):
        await db.store_reembed([(todo[0].chunk_id, np.ones(DIM, np.float32))])
    rest = await db.reembed_todo(10)
    await db.store_reembed([(t.chunk_id, new[int(t.content[-1])]) for t in rest])
    assert await db.finish_reembed() == EmbeddingConfig("new", 4)
    assert await db.get_embedding_config() == EmbeddingConfig("new", 4)
    assert await db.reembed_status() is None
    assert (await db.similarity_search(new[2], guild_id=1))[0].content == "text 2"
    with pytest.raises(DimensionMismatchError):
        await db.similarity_search(old[0], guild_id=1)


async def test_forget_a_users_messages_and_derived_chunks(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    s = ChatSession("thread:1", "thread", guild_id=1, channel_id=2, thread_id=1)
    s.add_message(Message("user", "secret of 42", author_id=42))
    s.add_message(Message("assistant", "ok"))
    s.add_message(Message("user", "hello from 43", author_id=43))
    s.last_archived_message_index = 2
    await db.save_session(s)
    other = ChatSession("mention:42", "mention", guild_id=99, user_id=42)
    other.add_message(Message("user", "in another guild", author_id=42))
    await db.save_session(other)
    v = unit(np.random.default_rng(1), 2)
    await db.save_source(
        KnowledgeSource(guild_id=1, uri="session:thread:1", title="conv"),
        [
            chunk("w0", "42 said a secret", v[0], metadata={"author_ids": [42, 43]}),
            chunk("w1", "43 only", v[1], metadata={"author_ids": [43]}),
        ],
    )
    result = await db.forget(guild_id=1, user_id=42)
    assert (result.messages, result.chunks) == (1, 1)
    loaded = await db.load_session("thread:1")
    assert loaded is not None
    assert [m.content for m in loaded.messages] == ["ok", "hello from 43"]
    assert loaded.version == 2 and loaded.last_archived_message_index <= 1
    assert [h.content for h in await db.similarity_search(v[0], guild_id=1)] == ["43 only"]
    untouched = await db.load_session("mention:42")
    assert untouched is not None and len(untouched.messages) == 1
    # A stale copy of the session conflicts instead of resurrecting the message.
    with pytest.raises(SessionConflictError):
        await db.save_session(s)

    everything = await db.forget(guild_id=1)
    assert everything.sessions == 1
    assert await db.load_session("thread:1") is None
    assert await db.similarity_search(v[1], guild_id=1) == []
    assert (await db.stats()).sessions == 1


async def test_data_and_schema_survive_reopen(database_url: str, settings: Settings) -> None:
    async with open_database(database_url, settings=settings) as db:
        version = await db.schema_version()
        assert version >= 1
        await db.set_embedding_config(EmbeddingConfig("t", DIM))
        s = ChatSession("dm:1", "dm", channel_id=1)
        s.add_message(Message("user", "remember me"))
        await db.save_session(s)
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="x", title="X"),
            [chunk("a", "persisted", np.ones(DIM, np.float32))],
        )
    async with open_database(database_url, settings=settings) as db:
        assert await db.schema_version() == version
        loaded = await db.load_session("dm:1")
        assert loaded is not None and loaded.messages[0].content == "remember me"
        hits = await db.similarity_search(np.ones(DIM), guild_id=1)
        assert [h.content for h in hits] == ["persisted"]
        stats = await db.stats()
        assert stats.embedding == EmbeddingConfig("t", DIM)
        assert stats.size_bytes > 0 and stats.schema_version == version
        assert "password" not in stats.location


async def test_ensure_source_creates_once_and_never_replaces(db: DatabaseProtocol) -> None:
    await db.set_embedding_config(EmbeddingConfig("t", DIM))
    src = KnowledgeSource(guild_id=3, uri="session:k", title="conv", source_type="conversation")
    first, second = await asyncio.gather(db.ensure_source(src), db.ensure_source(src))
    assert first.source_id is not None and first.source_id == second.source_id
    await db.add_chunks(first.source_id, [chunk("w0", "kept", np.ones(DIM, np.float32))])
    again = await db.ensure_source(
        KnowledgeSource(guild_id=3, uri="session:k", title="other title")
    )
    assert again.source_id == first.source_id and again.title == "conv"
    assert [c.content for c in await db.list_chunks(first.source_id)] == ["kept"]
    assert (await db.stats()).sources == 1


async def test_leases_have_one_owner_and_expire(db: DatabaseProtocol) -> None:
    assert await db.acquire_lease("archive:x", "worker-a", 60) is True
    assert await db.acquire_lease("archive:x", "worker-b", 60) is False
    assert await db.acquire_lease("archive:x", "worker-a", 60) is True  # renew
    await db.release_lease("archive:x", "worker-b")  # not the owner: no effect
    assert await db.acquire_lease("archive:x", "worker-b", 60) is False
    await db.release_lease("archive:x", "worker-a")
    assert await db.acquire_lease("archive:x", "worker-b", 0.2) is True
    await asyncio.sleep(0.3)  # worker-b "crashed": its lease expires
    results = await asyncio.gather(*(db.acquire_lease("archive:x", f"w{i}", 60) for i in range(5)))
    assert results.count(True) == 1


async def test_concurrent_embedders_leave_the_source_ready(
    database_url: str, settings: Settings
) -> None:
    """Two workers embedding disjoint halves of one source at once (two connections)."""
    vecs = unit(np.random.default_rng(12), 40)
    async with (
        open_database(database_url, settings=settings) as a,
        open_database(database_url, settings=settings) as b,
    ):
        await a.set_embedding_config(EmbeddingConfig("t", DIM))
        for round_ in range(6):
            src = await a.save_source(
                KnowledgeSource(guild_id=1, uri=f"half{round_}", title="H"),
                [chunk(f"k{i}", f"text {i}", None, chunk_index=i) for i in range(40)],
            )
            todo = await a.pending_chunks(100)
            assert len(todo) == 40
            halves = (todo[:20], todo[20:])
            await asyncio.gather(
                *(
                    w.set_chunk_embeddings([(p.chunk_id, vecs[i]) for i, p in enumerate(h)])
                    for w, h in ((a, halves[0]), (b, halves[1]))
                )
            )
            got = await b.get_source(src.source_id)  # type: ignore[arg-type]
            assert got is not None and got.status == "ready", f"round {round_}"
            assert (await b.stats()).pending_chunks == 0
