"""Both LLM providers, driven through the real SDKs against the fake API server.

Every test runs for Anthropic and for OpenAI through the ``flavor`` fixture; what
differs between the two wire formats lives in :class:`Flavor`, not in the tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import time
import traceback
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.errors import ConfigError, InvalidInputError, LLMError
from kotonoha_bot.llm import (
    ChatTurn,
    LLMProvider,
    create_llm_provider,
    missing_llm_settings,
)
from kotonoha_bot.llm.anthropic import DEFAULT_MODEL, LEADING_USER_TURN
from kotonoha_bot.llm.base import merge_turns
from tests.fakes.api_server import Endpoint, FakeAPIServer, Reply, fake_api_fixture

fake_api = fake_api_fixture()

_ENV_VARS = (
    "LLM_PROVIDER",
    "LLM_MODEL",
    "LLM_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "LLM_TIMEOUT",
    "LLM_MAX_RETRIES",
)


@dataclass(frozen=True)
class Flavor:
    """One provider and how its requests look on the wire."""

    provider: str
    endpoint: Endpoint
    sends_temperature: bool

    def settings(self, fake: FakeAPIServer, api_key: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"llm_provider": self.provider, "llm_max_retries": 2}
        if self.provider == "anthropic":
            values["anthropic_api_key"] = api_key
        else:
            values["openai_api_key"] = api_key
            values["llm_base_url"] = fake.openai_base_url
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    def base_url(self, fake: FakeAPIServer) -> str | None:
        # The OpenAI provider takes LLM_BASE_URL from the settings above.
        return fake.base_url if self.provider == "anthropic" else None

    def sent_system(self, body: dict[str, Any]) -> str | None:
        if self.provider == "anthropic":
            return body.get("system")
        first = body["messages"][0]
        return first["content"] if first["role"] == "system" else None

    def sent_turns(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"]


FLAVORS = {
    "anthropic": Flavor("anthropic", "messages", sends_temperature=False),
    "openai": Flavor("openai", "chat", sends_temperature=True),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    # The anthropic SDK may read profiles from its config dir; point it at nothing.
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "no-anthropic-config"))


@pytest.fixture
def api_key() -> str:
    """A fresh, recognisable key per test: if it shows up in any text we produce, it leaked.

    Fresh per test because the redaction registry is process-wide: a key shared between
    tests would be redacted thanks to whichever provider registered it first.
    """
    return f"sk-marker-{uuid.uuid4().hex}"


@pytest.fixture(params=sorted(FLAVORS))
def flavor(request: pytest.FixtureRequest) -> Flavor:
    return FLAVORS[str(request.param)]


MakeProvider = Callable[..., LLMProvider]


@pytest.fixture
async def make_provider(
    flavor: Flavor, fake_api: FakeAPIServer, api_key: str
) -> AsyncIterator[MakeProvider]:
    """``make_provider(**settings)`` builds the flavor's provider aimed at the fake server."""
    made: list[LLMProvider] = []

    def make(**overrides: Any) -> LLMProvider:
        settings = flavor.settings(fake_api, api_key, **overrides)
        provider = create_llm_provider(settings, base_url=flavor.base_url(fake_api))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


CONVERSATION = [
    ChatTurn("user", "hello"),
    ChatTurn("user", "are you there?"),
    ChatTurn("assistant", "I am here."),
    ChatTurn("user", "  "),
    ChatTurn("user", "what is the weather like?"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- happy path --------------------------------------------------------------------


async def test_prompt_reaches_the_model_in_the_providers_shape(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider, api_key: str
) -> None:
    provider = make_provider(llm_model="test-model-1")
    assert isinstance(provider, LLMProvider)
    assert provider.name == flavor.provider
    assert provider.model == "test-model-1"

    reply = await provider.complete("You are kotonoha.", CONVERSATION)

    assert reply.text == "echo: what is the weather like?"
    assert reply.model == "test-model-1"
    assert reply.input_tokens > 0
    assert reply.output_tokens > 0
    request = fake_api.last(flavor.endpoint)
    body = request.json
    assert body["model"] == "test-model-1"
    assert body["max_tokens"] == 1024
    assert flavor.sent_system(body) == "You are kotonoha."
    # Consecutive user turns merged, the blank turn dropped, order kept.
    assert flavor.sent_turns(body) == [
        ("user", "hello\n\nare you there?"),
        ("assistant", "I am here."),
        ("user", "what is the weather like?"),
    ]
    assert ("temperature" in body) is flavor.sends_temperature
    assert request.header("authorization") == f"Bearer {api_key}"


async def test_per_call_overrides_reach_the_request(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    provider = make_provider(llm_max_tokens=300, llm_temperature=0.2)
    await provider.complete("sys", [ChatTurn("user", "a")])
    await provider.complete("sys", [ChatTurn("user", "b")], max_tokens=17, temperature=1.3)

    first, second = (r.json for r in fake_api.requests_for(flavor.endpoint))
    assert (first["max_tokens"], second["max_tokens"]) == (300, 17)
    if flavor.sends_temperature:
        assert (first["temperature"], second["temperature"]) == (0.2, 1.3)


async def test_blank_system_prompt_is_not_sent(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    await make_provider().complete("  ", [ChatTurn("user", "hi")])
    assert flavor.sent_system(fake_api.last(flavor.endpoint).json) is None


async def test_scripted_answer_text_is_returned(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    fake_api.script(flavor.endpoint, [Reply(text="こんにちは、ことのはです。")])
    reply = await make_provider().complete("sys", [ChatTurn("user", "hi")])
    assert reply.text == "こんにちは、ことのはです。"
    assert reply.stop_reason in ("end_turn", "stop")


# --- retries -------------------------------------------------------------------------


async def test_429_then_success_is_retried_by_the_sdk(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    fake_api.script(flavor.endpoint, [429, 429])
    reply = await make_provider(llm_max_retries=2).complete("sys", [ChatTurn("user", "retry me")])

    assert reply.text == "echo: retry me"
    requests = fake_api.requests_for(flavor.endpoint)
    assert len(requests) == 3
    assert all(r.json == requests[0].json for r in requests)
    # retry-after-ms: 10 was honoured; the SDK's own backoff starts near 0.5 s.
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(requests)]
    assert max(gaps) < 0.35


async def test_persistent_500_becomes_llm_error_after_max_retries(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    fake_api.script(flavor.endpoint, [Reply(500, message="upstream exploded")] * 5)
    with pytest.raises(LLMError) as info:
        await make_provider(llm_max_retries=2).complete("sys", [ChatTurn("user", "x")])

    assert len(fake_api.requests_for(flavor.endpoint)) == 3
    message = str(info.value)
    assert message.startswith(f"{flavor.provider}: HTTP 500")
    assert "upstream exploded" in message


async def test_rate_limit_beyond_retries_names_the_status(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    fake_api.script(flavor.endpoint, [429] * 3)
    with pytest.raises(LLMError, match=rf"^{flavor.provider}: HTTP 429"):
        await make_provider(llm_max_retries=1).complete("sys", [ChatTurn("user", "x")])
    assert len(fake_api.requests_for(flavor.endpoint)) == 2
    assert fake_api.pending(flavor.endpoint) == 1


async def test_client_errors_are_not_retried(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    fake_api.script(flavor.endpoint, [Reply(400, message="bad model name")])
    with pytest.raises(LLMError, match=r"HTTP 400.*bad model name"):
        await make_provider(llm_max_retries=3).complete("sys", [ChatTurn("user", "x")])
    assert len(fake_api.requests_for(flavor.endpoint)) == 1


# --- timeouts and unreachable servers ------------------------------------------------


async def test_slow_answer_becomes_timeout_error(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    fake_api.script(flavor.endpoint, [Reply(delay=5.0), Reply(delay=5.0)])
    provider = make_provider(llm_timeout=0.3, llm_max_retries=1)
    started = time.monotonic()
    with pytest.raises(LLMError, match=rf"^{flavor.provider}: timed out") as info:
        await provider.complete("sys", [ChatTurn("user", "x")])
    elapsed = time.monotonic() - started

    # Two attempts of 0.3 s plus one SDK backoff (~0.4-0.5 s, no retry-after on a timeout).
    assert len(fake_api.requests_for(flavor.endpoint)) == 2
    assert 0.6 <= elapsed < 2.5
    assert "0.3 s" in str(info.value)


async def test_one_timeout_then_success(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider
) -> None:
    fake_api.script(flavor.endpoint, [Reply(delay=5.0)])
    provider = make_provider(llm_timeout=0.3, llm_max_retries=1)
    reply = await provider.complete("sys", [ChatTurn("user", "second try")])
    assert reply.text == "echo: second try"
    assert len(fake_api.requests_for(flavor.endpoint)) == 2


async def test_unreachable_server_becomes_llm_error(flavor: Flavor, api_key: str) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    overrides: dict[str, Any] = {"llm_max_retries": 0, "llm_provider": flavor.provider}
    if flavor.provider == "anthropic":
        overrides["anthropic_api_key"] = api_key
    else:
        overrides["openai_api_key"] = api_key
        url += "/v1"
    settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
    provider = create_llm_provider(settings, base_url=url)
    try:
        with pytest.raises(LLMError, match=rf"^{flavor.provider}: cannot connect to http"):
            await provider.complete("sys", [ChatTurn("user", "x")])
    finally:
        await provider.aclose()


# --- secrets ---------------------------------------------------------------------------


def _everything_printed(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


@pytest.mark.parametrize(
    "reply",
    [
        # OpenAI's real 401 quotes the rejected key; a proxy may echo it in full.
        Reply(401, message="Incorrect API key provided: {key}"),
        Reply(500, message="internal error while handling key {key}"),
        Reply(delay=5.0),
    ],
    ids=["401-echoing-key", "500-echoing-key", "timeout"],
)
async def test_api_key_never_leaks(
    flavor: Flavor,
    fake_api: FakeAPIServer,
    make_provider: MakeProvider,
    caplog: pytest.LogCaptureFixture,
    reply: Reply,
    api_key: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    if reply.message:
        reply = dataclasses.replace(reply, message=reply.message.format(key=api_key))
    fake_api.script(flavor.endpoint, [reply])
    provider = make_provider(llm_timeout=0.3, llm_max_retries=0)
    assert api_key not in repr(provider)

    with pytest.raises(LLMError) as info:
        await provider.complete("sys", [ChatTurn("user", "x")])

    # The key did travel (so the check below is meaningful) ...
    assert fake_api.last(flavor.endpoint).header("authorization") == f"Bearer {api_key}"
    # ... but appears nowhere we print.
    printed = _everything_printed(info.value)
    assert api_key not in printed
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    # The SDK's own debug logging was captured, and none of it holds the key.
    assert any(r.name.startswith(flavor.provider) for r in caplog.records)
    assert api_key not in caplog.text
    for record in caplog.records:
        assert api_key not in record.getMessage()


async def test_auth_failure_does_not_quote_the_servers_message(
    flavor: Flavor, fake_api: FakeAPIServer, make_provider: MakeProvider, api_key: str
) -> None:
    # OpenAI's 401 quotes a masked key ("sk-abc*****wxyz"): redaction cannot catch that.
    masked = f"{api_key[:6]}{'*' * 20}{api_key[-4:]}"
    fake_api.script(flavor.endpoint, [Reply(401, message=f"Incorrect API key provided: {masked}")])
    with pytest.raises(LLMError) as info:
        await make_provider().complete("sys", [ChatTurn("user", "x")])
    assert masked not in _everything_printed(info.value)
    assert str(info.value).startswith(f"{flavor.provider}: HTTP 401")
    assert f"check {flavor.provider.upper()}_API_KEY" in str(info.value)
    assert len(fake_api.requests_for(flavor.endpoint)) == 1


async def test_successful_call_logs_no_key(
    flavor: Flavor,
    fake_api: FakeAPIServer,
    make_provider: MakeProvider,
    caplog: pytest.LogCaptureFixture,
    api_key: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_api.script(flavor.endpoint, [429])
    await make_provider().complete("sys", [ChatTurn("user", "x")])
    assert any(r.name.startswith("kotonoha_bot.llm") for r in caplog.records)
    assert api_key not in caplog.text


# --- Anthropic specifics ------------------------------------------------------------


async def test_anthropic_conversation_starting_with_assistant_gets_a_user_turn_first(
    fake_api: FakeAPIServer,
) -> None:
    settings = FLAVORS["anthropic"].settings(fake_api, "sk-test")
    provider = create_llm_provider(settings, base_url=fake_api.base_url)
    try:
        await provider.complete(
            "sys", [ChatTurn("assistant", "I could help!"), ChatTurn("user", "please")]
        )
    finally:
        await provider.aclose()
    turns = FLAVORS["anthropic"].sent_turns(fake_api.last("messages").json)
    assert turns == [
        ("user", LEADING_USER_TURN),
        ("assistant", "I could help!"),
        ("user", "please"),
    ]


async def test_fake_rejects_temperature_like_the_real_messages_api(
    fake_api: FakeAPIServer,
) -> None:
    # Guards the reason the Anthropic provider sends no temperature: if the fake
    # stopped rejecting it, the happy-path assertion above would lose its meaning.
    import anthropic

    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=fake_api.base_url)
    try:
        with pytest.raises(anthropic.BadRequestError, match="temperature"):
            await client.messages.create(
                model="m",
                max_tokens=5,
                messages=[{"role": "user", "content": "x"}],
                extra_body={"temperature": 1.0},
            )
    finally:
        await client.close()


# --- settings and input checks ------------------------------------------------------


def test_missing_llm_settings_names_the_env_vars() -> None:
    def settings(**values: Any) -> Settings:
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    assert missing_llm_settings(settings(llm_provider="anthropic")) == ["ANTHROPIC_API_KEY"]
    assert missing_llm_settings(settings(llm_provider="anthropic", anthropic_api_key="")) == [
        "ANTHROPIC_API_KEY"
    ]
    assert missing_llm_settings(settings(llm_provider="anthropic", anthropic_api_key="k")) == []
    # An OpenAI key does not satisfy Anthropic.
    assert missing_llm_settings(settings(llm_provider="anthropic", openai_api_key="k")) == [
        "ANTHROPIC_API_KEY"
    ]
    assert missing_llm_settings(settings(llm_provider="openai")) == ["OPENAI_API_KEY"]
    assert missing_llm_settings(settings(llm_provider="openai", openai_api_key="k")) == []
    assert (
        missing_llm_settings(
            settings(llm_provider="openai", llm_base_url="http://localhost:11434/v1")
        )
        == []
    )


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_create_without_key_is_a_config_error(provider: str) -> None:
    settings = Settings(_env_file=None, llm_provider=provider)  # type: ignore[call-arg,arg-type]
    with pytest.raises(ConfigError, match="_API_KEY"):
        create_llm_provider(settings)


async def test_local_openai_server_needs_no_key(fake_api: FakeAPIServer) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, llm_provider="openai", llm_base_url=fake_api.openai_base_url
    )
    provider = create_llm_provider(settings)
    try:
        reply = await provider.complete("sys", [ChatTurn("user", "ollama?")])
    finally:
        await provider.aclose()
    assert reply.text == "echo: ollama?"
    assert provider.model == "gpt-4o-mini"
    assert fake_api.last("chat").header("authorization") == "Bearer not-needed"


async def test_default_anthropic_model_is_not_deprecated(fake_api: FakeAPIServer) -> None:
    settings = FLAVORS["anthropic"].settings(fake_api, "sk-test")
    provider = create_llm_provider(settings, base_url=fake_api.base_url)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await provider.complete("sys", [ChatTurn("user", "hi")])
    finally:
        await provider.aclose()
    assert provider.model == DEFAULT_MODEL == fake_api.last("messages").json["model"]
    # The SDK warns about models near end-of-life (claude-sonnet-4-5: 2026-11-30).
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_turn_checks() -> None:
    with pytest.raises(InvalidInputError):
        ChatTurn("system", "x")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        merge_turns([ChatTurn("user", " "), ChatTurn("assistant", "")])
    with pytest.raises(InvalidInputError):
        merge_turns([])
