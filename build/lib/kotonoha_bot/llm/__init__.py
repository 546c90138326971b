"""Chat-model providers (Anthropic, OpenAI-compatible) behind one ``LLMProvider`` contract.

``create_llm_provider(settings)`` picks the provider named by ``LLM_PROVIDER``; the
SDK of the other provider is never imported.
"""

from __future__ import annotations

from kotonoha_bot.config import Settings
from kotonoha_bot.errors import ConfigError
from kotonoha_bot.llm.base import ChatRole, ChatTurn, LLMProvider, LLMReply

__all__ = [
    "ChatRole",
    "ChatTurn",
    "LLMProvider",
    "LLMReply",
    "create_llm_provider",
    "missing_llm_settings",
]


def missing_llm_settings(settings: Settings) -> list[str]:
    """Environment variables the chosen ``LLM_PROVIDER`` needs but are not set."""
    if settings.llm_provider == "anthropic":
        key = settings.anthropic_api_key
        return [] if key and key.get_secret_value() else ["ANTHROPIC_API_KEY"]
    key = settings.openai_api_key
    if (key and key.get_secret_value()) or settings.llm_base_url:
        return []
    return ["OPENAI_API_KEY"]


def create_llm_provider(settings: Settings, *, base_url: str | None = None) -> LLMProvider:
    """The provider named by ``LLM_PROVIDER``; ``ConfigError`` naming missing settings.

    ``base_url`` overrides the endpoint (``LLM_BASE_URL`` for openai; the Anthropic
    API for anthropic), e.g. to point the SDK at a test server.
    """
    missing = missing_llm_settings(settings)
    if missing and not (base_url and settings.llm_provider == "openai"):
        raise ConfigError(
            f"LLM_PROVIDER={settings.llm_provider} needs {', '.join(missing)} to be set"
        )
    if settings.llm_provider == "anthropic":
        from kotonoha_bot.llm.anthropic import AnthropicProvider

        return AnthropicProvider(settings, base_url=base_url)
    from kotonoha_bot.llm.openai_chat import OpenAIChatProvider

    return OpenAIChatProvider(settings, base_url=base_url)
