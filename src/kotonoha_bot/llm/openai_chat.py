"""OpenAI and OpenAI-compatible servers (Ollama, vLLM, LM Studio) through the ``openai`` SDK."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import openai
from openai.types.chat import ChatCompletionMessageParam

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

DEFAULT_MODEL = "gpt-4o-mini"
# Local servers ignore the key, but the SDK refuses to start without one.
PLACEHOLDER_API_KEY = "not-needed"

log = logging.getLogger(__name__)


class OpenAIChatProvider:
    """``LLMProvider`` for Chat Completions. ``base_url`` overrides ``LLM_BASE_URL``."""

    name = "openai"

    def __init__(self, settings: Settings, *, base_url: str | None = None) -> None:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
        base_url = base_url or settings.llm_base_url
        if not key and not base_url:
            raise ConfigError(
                "OPENAI_API_KEY is not set (required when LLM_PROVIDER=openai "
                "and LLM_BASE_URL is not set)"
            )
        register_secret(key)
        self._model = settings.llm_model or DEFAULT_MODEL
        self._max_tokens = settings.llm_max_tokens
        self._temperature = settings.llm_temperature
        self._timeout = settings.llm_timeout
        self._max_retries = settings.llm_max_retries
        self._client = openai.AsyncOpenAI(
            api_key=key or PLACEHOLDER_API_KEY,
            base_url=base_url,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
        )

    @property
    def model(self) -> str:
        """The model requested on every call."""
        return self._model

    def __repr__(self) -> str:
        return f"OpenAIChatProvider(model={self._model!r})"

    async def complete(
        self,
        system: str,
        messages: Sequence[ChatTurn],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        model: str | None = None,
    ) -> LLMReply:
        """Answer the conversation; ``LLMError`` when the server fails after the SDK's retries."""
        params: list[ChatCompletionMessageParam] = []
        if system.strip():
            params.append({"role": "system", "content": system})
        for turn in merge_turns(messages):
            if turn.role == "user":
                params.append({"role": "user", "content": turn.content})
            else:
                params.append({"role": "assistant", "content": turn.content})
        started = time.monotonic()
        try:
            # max_tokens rather than max_completion_tokens: every compatible server knows it.
            response = await self._client.chat.completions.create(
                model=model or self._model,
                messages=params,
                max_tokens=max_tokens or self._max_tokens,
                temperature=self._temperature if temperature is None else temperature,
            )
        except openai.APITimeoutError:
            raise timeout_error(self.name, self._timeout, self._max_retries) from None
        except openai.APIConnectionError:
            raise connection_error(self.name, str(self._client.base_url)) from None
        except openai.APIStatusError as exc:
            raise status_error(
                self.name, exc.status_code, exc.body, key_setting="OPENAI_API_KEY"
            ) from None
        except openai.OpenAIError as exc:
            raise LLMError(f"{self.name}: {type(exc).__name__}") from None
        if not response.choices:
            raise LLMError(f"{self.name}: the answer held no choices")
        choice = response.choices[0]
        usage = response.usage
        # Compatible servers are not all strict about the schema the SDK does not check:
        # a null message or null token counts read as empty / 0, not as a crash.
        message = choice.message
        reply = LLMReply(
            text=(message.content if message is not None else None) or "",
            model=response.model or model or self._model,
            input_tokens=(usage.prompt_tokens if usage else 0) or 0,
            output_tokens=(usage.completion_tokens if usage else 0) or 0,
            stop_reason=choice.finish_reason,
        )
        log.debug(
            "openai reply: model=%s in=%d out=%d stop=%s %.2fs",
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
