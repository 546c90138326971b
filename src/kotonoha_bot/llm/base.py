"""The chat-model contract: one ``complete`` call, the same for every provider.

Providers wrap the official SDKs and use the SDKs' own retry machinery
(``LLM_MAX_RETRIES``: 408/409/429/5xx and connection errors/timeouts are retried with
exponential backoff, honouring ``retry-after-ms``/``retry-after``). ``LLM_TIMEOUT`` is
applied to each HTTP attempt, so a call that keeps timing out can take about
``(LLM_MAX_RETRIES + 1) * LLM_TIMEOUT`` plus backoff before it fails.

Every failure reaches the caller as :class:`~kotonoha_bot.errors.LLMError` with a
short message naming the provider and the status or timeout; the SDK exception is
not chained (it holds the request, headers included), and API keys are registered
with :mod:`kotonoha_bot.redact` so they are removed from any text we build.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from kotonoha_bot.errors import InvalidInputError, LLMError
from kotonoha_bot.redact import redact, safe_url

ChatRole = Literal["user", "assistant"]

# Server error messages are quoted in LLMError, cut to this length.
MAX_ERROR_DETAIL_CHARS = 200


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One turn sent to the model: who spoke (``user`` or ``assistant``) and what."""

    role: ChatRole
    content: str

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise InvalidInputError(
                f"chat turn role must be 'user' or 'assistant', not {self.role!r}"
            )


@dataclass(frozen=True, slots=True)
class LLMReply:
    """The model's answer. ``text`` may be empty (e.g. the model stopped at once)."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None = None


@runtime_checkable
class LLMProvider(Protocol):
    """A chat model: ``complete`` a conversation, ``aclose`` when done."""

    @property
    def name(self) -> str:
        """Provider name as in ``LLM_PROVIDER`` (``anthropic``, ``openai``)."""
        ...

    @property
    def model(self) -> str:
        """The model requested on every call."""
        ...

    async def complete(
        self,
        system: str,
        messages: Sequence[ChatTurn],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        model: str | None = None,
    ) -> LLMReply:
        """Answer the conversation; ``LLMError`` when the model fails after retries.

        ``model`` asks another model of the same provider for this one call (e.g. a
        cheaper one for the relevance judge); None = :attr:`model`.
        """
        ...

    async def aclose(self) -> None:
        """Release the HTTP connections."""
        ...


def merge_turns(messages: Sequence[ChatTurn]) -> list[ChatTurn]:
    """Drop blank turns and join consecutive same-role turns with a blank line.

    Anthropic requires user/assistant alternation, and several local chat templates
    (llama.cpp, Mistral) do too; joining keeps every word while satisfying them.
    """
    merged: list[ChatTurn] = []
    for turn in messages:
        if not isinstance(turn, ChatTurn):
            raise InvalidInputError(f"expected ChatTurn, got {type(turn).__name__}")
        if not turn.content.strip():
            continue
        if merged and merged[-1].role == turn.role:
            merged[-1] = ChatTurn(turn.role, f"{merged[-1].content}\n\n{turn.content}")
        else:
            merged.append(turn)
    if not merged:
        raise InvalidInputError("no non-empty chat turns to send to the model")
    return merged


def error_detail(body: object) -> tuple[str | None, str | None]:
    """``(type, message)`` from an Anthropic- or OpenAI-shaped error body, when present."""
    inner: Any = body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        inner = body["error"]
    if not isinstance(inner, dict):
        return None, None
    kind = inner.get("type") or inner.get("code")
    message = inner.get("message")
    return (
        str(kind) if kind is not None else None,
        str(message) if message is not None else None,
    )


def shorten(text: str, limit: int = MAX_ERROR_DETAIL_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def status_error(provider: str, status: int, body: object, *, key_setting: str) -> LLMError:
    """``LLMError`` for an HTTP error answer, e.g. ``anthropic: HTTP 429 rate_limit_error: ...``."""
    kind, message = error_detail(body)
    text = f"{provider}: HTTP {status}"
    if kind:
        text += f" {kind}"
    if status in (401, 403):
        # OpenAI quotes part of the rejected key in its 401 message: never repeat it.
        text += f" (check {key_setting})"
    elif message:
        text += f": {shorten(message)}"
    return LLMError(redact(text))


def timeout_error(provider: str, timeout: float, max_retries: int) -> LLMError:
    """``LLMError`` for a model that did not answer within ``LLM_TIMEOUT`` on any attempt."""
    attempts = max_retries + 1
    return LLMError(
        f"{provider}: timed out (no answer within {timeout:g} s, "
        f"{attempts} attempt{'s' if attempts != 1 else ''})"
    )


def connection_error(provider: str, base_url: str) -> LLMError:
    """``LLMError`` for a server that cannot be reached."""
    return LLMError(f"{provider}: cannot connect to {safe_url(base_url)}")
