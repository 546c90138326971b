"""Embedding providers behind one protocol, chosen by ``EMBEDDING_PROVIDER``.

======== ============================================= ==========================
provider vectors                                       needs
======== ============================================= ==========================
openai   semantic; text-embedding-3-small, 1536 dims   OPENAI_API_KEY, or
                                                       EMBEDDING_BASE_URL (Ollama…)
local    semantic; all-MiniLM-L6-v2, 384 dims          ``[local]`` extra (torch)
hashing  lexical only; hashing-ngram-v1, 512 dims      nothing (numpy)
======== ============================================= ==========================

``auto`` (the default) takes ``openai`` when an API key or an OpenAI-compatible
endpoint is configured, otherwise ``hashing``, and logs one line saying which and why.
Providers are imported only when chosen, so the hashing path never loads the
openai SDK or torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kotonoha_bot.knowledge.embeddings.base import (
    EmbeddingProvider,
    Vectors,
    embedding_config,
)

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

__all__ = ["EmbeddingProvider", "Vectors", "create_embedding_provider", "embedding_config"]

log = logging.getLogger("kotonoha_bot.knowledge")


def create_embedding_provider(settings: Settings) -> EmbeddingProvider:
    """Build the provider the settings ask for (``auto`` decides and logs why)."""
    choice = settings.embedding_provider
    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    if choice == "auto":
        if api_key:
            choice, why = "openai", "OPENAI_API_KEY is set"
        elif settings.embedding_base_url:
            choice, why = "openai", "EMBEDDING_BASE_URL is set"
        else:
            choice = "hashing"
            why = (
                "OPENAI_API_KEY is not set; search is lexical only (set OPENAI_API_KEY or"
                " EMBEDDING_PROVIDER=local for semantic search)"
            )
    else:
        why = "EMBEDDING_PROVIDER is set"

    provider: EmbeddingProvider
    if choice == "openai":
        from kotonoha_bot.knowledge.embeddings.openai_api import OpenAIEmbeddingProvider

        provider = OpenAIEmbeddingProvider(
            api_key=api_key,
            model=settings.embedding_model,
            dimension=settings.embedding_dimension,
            base_url=settings.embedding_base_url,
            batch_size=settings.embedding_batch_size,
            timeout=settings.embedding_timeout,
            max_retries=settings.embedding_max_retries,
        )
    elif choice == "local":
        from kotonoha_bot.knowledge.embeddings.local import LocalEmbeddingProvider

        provider = LocalEmbeddingProvider(
            settings.embedding_model,
            dimension=settings.embedding_dimension,
            batch_size=settings.embedding_batch_size,
        )
    else:
        from kotonoha_bot.knowledge.embeddings.hashing import HashingEmbeddingProvider

        provider = HashingEmbeddingProvider(
            dimension=settings.embedding_dimension, model=settings.embedding_model
        )
    log.info(
        "embedding provider: %s (%s, %d dimensions) because %s",
        provider.name,
        provider.model,
        provider.dimension,
        why,
    )
    return provider
