"""Building the real pipeline for tests: real storage, real SDK clients, the fake API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from kotonoha_bot.chat import ChatService
from kotonoha_bot.chat.service import checked_embedder
from kotonoha_bot.config import Settings
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.knowledge.embeddings import create_embedding_provider
from kotonoha_bot.knowledge.ingest import ingest_text
from kotonoha_bot.llm import create_llm_provider
from tests.fakes.api_server import FakeAPIServer

API_KEY = "sk-ant-test-9f3c2b7e51d04a8e"


def chat_settings(tmp_path: Path, provider: str = "anthropic", **overrides: Any) -> Settings:
    """Settings for the pipeline against the fake API (no .env, offline embeddings)."""
    values: dict[str, Any] = {
        "database_path": tmp_path / "kotonoha.db",
        "llm_provider": provider,
        "llm_max_retries": 0,
        "llm_timeout": 5.0,
        "embedding_provider": "hashing",
    }
    if provider == "anthropic":
        values["anthropic_api_key"] = API_KEY
    else:
        values["openai_api_key"] = API_KEY
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def llm_base_url(fake: FakeAPIServer, settings: Settings) -> str:
    return fake.base_url if settings.llm_provider == "anthropic" else fake.openai_base_url


@asynccontextmanager
async def chat_service(
    db: DatabaseProtocol, fake: FakeAPIServer, settings: Settings, **kwargs: Any
) -> AsyncIterator[ChatService]:
    """A ChatService on ``db`` whose LLM is the real SDK pointed at ``fake``."""
    embedder = create_embedding_provider(settings)
    llm = create_llm_provider(settings, base_url=llm_base_url(fake, settings))
    service = ChatService(db, llm, await checked_embedder(db, embedder), settings, **kwargs)
    try:
        yield service
    finally:
        await service.close()
        await llm.aclose()
        await embedder.aclose()


async def add_document(
    service: ChatService, guild_id: int, uri: str, text: str, channel_id: int | None = None
) -> None:
    """Put a document into a guild's knowledge base (with embeddings)."""
    await ingest_text(
        service.db, service.embedder, uri=uri, text=text, guild_id=guild_id, channel_id=channel_id
    )


def request_text(body: Any) -> str:
    """Everything the model was sent, as one string (system + all messages)."""
    import json

    return json.dumps(body, ensure_ascii=False)


def sent_turns(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of the non-system messages of an Anthropic or OpenAI request."""
    out = []
    for m in body["messages"]:
        if m["role"] == "system":
            continue
        content = m["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        out.append((m["role"], content))
    return out


def sent_system(body: dict[str, Any]) -> str:
    if "system" in body:
        system = body["system"]
        return system if isinstance(system, str) else "".join(p["text"] for p in system)
    first = body["messages"][0]
    return str(first["content"]) if first["role"] == "system" else ""
