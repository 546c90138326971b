"""Claude through the official ``anthropic`` SDK (Messages API).

No temperature is sent: the Messages API version the SDK 2.x speaks (``anthropic-version:
2026-10-21``) rejects ``temperature``/``top_p``/``top_k`` with HTTP 400 (even 1.0), and
the SDK no longer has those parameters. ``LLM_TEMPERATURE`` therefore only applies to
OpenAI-compatible providers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import anthropic
from anthropic.types import AssistantMessageParam, MessageParam, UserMessageParam

from kotonoha_bot.config import Settings
from kotonoha_bot.errors import ConfigError, LLMError
from kotonoha_bot.llm.base import (
    ChatTurn,
    LLMReply,
    connection_error,
    merge_turns,
    status_error,
    timeout_error,
)
from kotonoha_bot.redact import register_secret

# claude-sonnet-4-5 (the first choice) reaches end-of-life on 2026-11-30 per the SDK.
DEFAULT_MODEL = "claude-sonnet-5-5"
# The Messages API requires the first turn to be the user's. When a conversation
# starts with the bot speaking (an eavesdrop interjection), this stands in for it.
LEADING_USER_TURN = "(会話の続き / conversation so far)"

log = logging.getLogger(__name__)


class AnthropicProvider:
    """``LLMProvider`` for Claude. ``base_url`` points the SDK elsewhere (tests, gateways)."""

    name = "anthropic"

    def __init__(self, settings: Settings, *, base_url: str | None = None) -> None:
        key = settings.anthropic_api_key.get_secret_value() if settings.anthropic_api_key else ""
        if not key:
            raise ConfigError("ANTHROPIC_API_KEY is not set (required when LLM_PROVIDER=anthropic)")
        register_secret(key)
        self._model = settings.llm_model or DEFAULT_MODEL
        self._max_tokens = settings.llm_max_tokens
        self._timeout = settings.llm_timeout
        self._max_retries = settings.llm_max_retries
        self._client = anthropic.AsyncAnthropic(
            api_key=key,
            base_url=base_url,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
        )

    @property
    def model(self) -> str:
        """The Claude model requested on every call."""
        return self._model

    def __repr__(self) -> str:
        return f"AnthropicProvider(model={self._model!r})"

    async def complete(
        self,
        system: str,
        messages: Sequence[ChatTurn],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        model: str | None = None,
    ) -> LLMReply:
        """Answer the conversation; ``LLMError`` when Claude fails after the SDK's retries.

        ``temperature`` is accepted for the protocol's sake and ignored (see the module doc).
        """
        turns = merge_turns(messages)
        if turns[0].role != "user":
            turns.insert(0, ChatTurn("user", LEADING_USER_TURN))
        params: list[MessageParam] = [
            UserMessageParam(role="user", content=t.content)
            if t.role == "user"
            else AssistantMessageParam(role="assistant", content=t.content)
            for t in turns
        ]
        started = time.monotonic()
        try:
            response = await self._client.messages.create(
                model=model or self._model,
                max_tokens=max_tokens or self._max_tokens,
                system=system if system.strip() else anthropic.omit,
                messages=params,
            )
        except anthropic.APITimeoutError:
            raise timeout_error(self.name, self._timeout, self._max_retries) from None
        except anthropic.APIConnectionError:
            raise connection_error(self.name, str(self._client.base_url)) from None
        except anthropic.APIStatusError as exc:
            raise status_error(
                self.name, exc.status_code, exc.body, key_setting="ANTHROPIC_API_KEY"
            ) from None
        except anthropic.AnthropicError as exc:
            raise LLMError(f"{self.name}: {type(exc).__name__}") from None
        text = "".join(block.text for block in response.content if block.type == "text")
        reply = LLMReply(
            text=text,
            model=response.model or model or self._model,
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
            stop_reason=response.stop_reason,
        )
        log.debug(
            "anthropic reply: model=%s in=%d out=%d stop=%s %.2fs",
            reply.model,
            reply.input_tokens,
            reply.output_tokens,
            reply.stop_reason,
            time.monotonic() - started,
        )
        return reply

    async def aclose(self) -> None:
        """Close the SDK's HTTP connections."""
        await self._client.close()
