"""A fake Anthropic + OpenAI HTTP API on 127.0.0.1 for driving the real SDK clients.

The LLM APIs are unreachable in tests, so the official ``anthropic`` and ``openai``
clients are pointed at this aiohttp server instead. It speaks just enough of three
endpoints, with the providers' own response and error shapes:

=============  ===========================  =======================================
endpoint name  path                         SDK base URL to use
=============  ===========================  =======================================
``messages``   POST /v1/messages            ``server.base_url`` (Anthropic)
``chat``       POST /v1/chat/completions    ``server.openai_base_url`` (OpenAI)
``embeddings`` POST /v1/embeddings          ``server.openai_base_url`` (OpenAI)
=============  ===========================  =======================================

Usage::

    async with FakeAPIServer() as server:
        client = AsyncAnthropic(api_key="test-key", base_url=server.base_url)
        server.script("messages", [Reply(429), Reply(200)])   # one 429, then success
        ...
        assert len(server.requests_for("messages")) == 2
        assert server.last("messages").json["system"] == "be brief"

Behaviour per request: the next scripted :class:`Reply` for that endpoint is used
(a FIFO queue per endpoint); when the queue is empty, the default is a 200 with the
server's ``reply(request_json)`` text for chat endpoints, or deterministic vectors
for embeddings. The default reply echoes the last user message (``"echo: <text>"``)
so tests can check that the prompt reached the model.

Like the real Messages API, ``messages`` answers 401 without a credential header and,
for ``anthropic-version`` 2026-10-21 or later, 400 to ``temperature``/``top_p``/``top_k``.

Error replies carry ``retry-after-ms: 10`` unless told otherwise, so the SDKs'
retry machinery (which honours that header) retries quickly instead of waiting
its exponential backoff (0.5 s, 1 s, 2 s ... for Anthropic and OpenAI).

Every request is recorded (:class:`RecordedRequest`: endpoint, JSON body, headers,
arrival time). Headers hold the API key: they are kept out of the record's repr so
an assertion failure never prints them; compare them through :meth:`RecordedRequest.header`.

In a test module, ``fake_api = fake_api_fixture()`` gives a ``fake_api`` fixture.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import random
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest_asyncio
from aiohttp import web

Endpoint = Literal["messages", "chat", "embeddings"]
ENDPOINTS: tuple[Endpoint, ...] = ("messages", "chat", "embeddings")

_PATHS: dict[str, Endpoint] = {
    "/v1/messages": "messages",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
}

# Anthropic's error "type" per status code (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
# OpenAI's error "type"/"code" per status code.
_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}

DEFAULT_EMBEDDING_DIMENSION = 8

# From this Messages API version on (sent by anthropic SDK 2.x), sampling parameters
# are rejected with 400 "Extra inputs are not permitted", even temperature=1.0.
ANTHROPIC_NO_SAMPLING_VERSION = "2026-10-21"
_ANTHROPIC_SAMPLING_PARAMS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class Reply:
    """One scripted behaviour for one request.

    ``Reply(429)`` answers with the provider's error body for 429; ``Reply(200)``
    (or ``Reply()``) gives the normal success answer; ``Reply(text="hi")`` a success
    whose answer text is ``hi``; ``Reply(delay=2.0)`` waits 2 s first (for client
    timeouts); ``Reply(500, body={...})`` sends that exact JSON body;
    ``Reply(vectors=[[...], ...])`` scripts the embeddings of a success;
    ``Reply(usage=(1200, 34))`` the (input, output) tokens a chat success reports
    (default: one token per whitespace-separated word).
    ``retry_after_ms`` is sent as the ``retry-after-ms`` header on error replies
    (``None`` = no header, so the SDK uses its own backoff).
    """

    status: int = 200
    body: Any = None
    text: str | None = None
    delay: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    message: str | None = None
    retry_after_ms: int | None = 10
    vectors: list[list[float]] | None = None
    usage: tuple[int, int] | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """A request the server received. ``json`` is ``None`` when the body was not JSON."""

    endpoint: str
    path: str
    json: Any
    headers: Mapping[str, str] = field(repr=False)
    received_at: float = 0.0

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or ``None``."""
        return self.headers.get(name.lower())


def last_user_text(request_json: Any) -> str:
    """The text of the last user message in an Anthropic or OpenAI chat request."""
    messages = request_json.get("messages", []) if isinstance(request_json, dict) else []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any) -> str:
    """Flatten a message ``content`` (a string or a list of text blocks/parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def echo_reply(request_json: Any) -> str:
    """The default answer: ``"echo: "`` + the last user message."""
    return f"echo: {last_user_text(request_json)}"


def fake_embedding(text: str, dimension: int) -> list[float]:
    """A deterministic unit vector for ``text`` (same text, same vector; seeded by SHA-256)."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 1.0) for _ in range(dimension)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _count_tokens(text: str) -> int:
    # A stand-in for a tokenizer: good enough for usage numbers that are not zero.
    return max(1, len(text.split()))


class FakeAPIServer:
    """An aiohttp server on 127.0.0.1 (random free port) faking Anthropic and OpenAI."""

    def __init__(
        self,
        *,
        reply: Callable[[Any], str] = echo_reply,
        embedding_dimension: int = DEFAULT_EMBEDDING_DIMENSION,
    ) -> None:
        self.reply = reply
        """Default answer text for chat endpoints, from the request JSON."""
        self.embedding_dimension = embedding_dimension
        """Vector size of default embeddings (a request's ``dimensions`` wins)."""
        self.requests: list[RecordedRequest] = []
        self._scripts: dict[str, deque[Reply]] = {name: deque() for name in ENDPOINTS}
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0

    # --- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Start listening on 127.0.0.1 on a free port."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop the server; delayed replies still waiting are released at once."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAPIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- addresses -------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        return self._port

    @property
    def base_url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:12345`` (the Anthropic SDK's ``base_url``)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def openai_base_url(self) -> str:
        """``base_url`` + ``/v1`` (the OpenAI SDK's ``base_url``, like Ollama's)."""
        return f"{self.base_url}/v1"

    # --- scripting -------------------------------------------------------------------
    def script(self, endpoint: Endpoint, replies: Iterable[Reply | int]) -> None:
        """Queue behaviours for the next requests to ``endpoint`` (ints mean ``Reply(status)``)."""
        if endpoint not in self._scripts:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
        for item in replies:
            self._scripts[endpoint].append(Reply(item) if isinstance(item, int) else item)

    def pending(self, endpoint: Endpoint) -> int:
        """How many scripted replies for ``endpoint`` have not been used yet."""
        return len(self._scripts[endpoint])

    def reset(self) -> None:
        """Forget recorded requests and scripted replies."""
        self.requests.clear()
        for queue in self._scripts.values():
            queue.clear()

    # --- inspection ------------------------------------------------------------------
    def requests_for(self, endpoint: Endpoint) -> list[RecordedRequest]:
        """Recorded requests to ``endpoint``, oldest first."""
        return [r for r in self.requests if r.endpoint == endpoint]

    def last(self, endpoint: Endpoint) -> RecordedRequest:
        """The most recent request to ``endpoint`` (``AssertionError`` when none)."""
        found = self.requests_for(endpoint)
        assert found, f"no request reached {endpoint!r}"
        return found[-1]

    # --- handling --------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        endpoint = _PATHS.get(request.path, "unknown")
        self.requests.append(
            RecordedRequest(
                endpoint=endpoint,
                path=request.path,
                json=body,
                headers={k.lower(): v for k, v in request.headers.items()},
                received_at=time.monotonic(),
            )
        )
        if endpoint == "unknown" or request.method != "POST":
            return web.json_response(
                _openai_error(404, f"fake API: no route {request.method} {request.path}"),
                status=404,
            )
        queue = self._scripts[endpoint]
        scripted = queue.popleft() if queue else Reply()
        if scripted.delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), scripted.delay)
            if self._closing.is_set():
                return web.Response(status=503)
        if scripted.status >= 400 or scripted.body is not None:
            return self._scripted_response(endpoint, scripted)
        if not isinstance(body, dict):
            return web.json_response(_error_body(endpoint, 400, "body is not JSON"), status=400)
        if body.get("stream"):
            return web.json_response(
                _error_body(endpoint, 400, "fake API does not stream"), status=400
            )
        if endpoint == "messages":
            problem = _anthropic_request_problem(request, body)
            if problem is not None:
                status, message = problem
                return web.json_response(_anthropic_error(status, message), status=status)
            payload = self._anthropic_message(body, scripted)
        elif endpoint == "chat":
            payload = self._openai_chat(body, scripted)
        else:
            try:
                payload = self._openai_embeddings(body, scripted)
            except ValueError as exc:
                return web.json_response(_openai_error(400, str(exc)), status=400)
        return web.json_response(payload, status=scripted.status, headers=scripted.headers)

    def _scripted_response(self, endpoint: str, scripted: Reply) -> web.Response:
        headers = dict(scripted.headers)
        if scripted.status >= 400 and scripted.retry_after_ms is not None:
            headers.setdefault("retry-after-ms", str(scripted.retry_after_ms))
        if scripted.status >= 400 and endpoint == "messages":
            headers.setdefault("request-id", f"req_{uuid.uuid4().hex[:16]}")
        body = scripted.body
        if body is None:
            message = scripted.message or f"fake {scripted.status} error"
            body = _error_body(endpoint, scripted.status, message)
        if isinstance(body, str | bytes):
            return web.Response(body=body, status=scripted.status, headers=headers)
        return web.json_response(body, status=scripted.status, headers=headers)

    def _anthropic_message(self, body: dict[str, Any], scripted: Reply) -> dict[str, Any]:
        text = scripted.text if scripted.text is not None else self.reply(body)
        prompt = content_text(body.get("system")) + "".join(
            content_text(m.get("content")) for m in body.get("messages", []) if isinstance(m, dict)
        )
        tokens_in, tokens_out = scripted.usage or (_count_tokens(prompt), _count_tokens(text))
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "model": body.get("model", "claude-fake"),
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }

    def _openai_chat(self, body: dict[str, Any], scripted: Reply) -> dict[str, Any]:
        text = scripted.text if scripted.text is not None else self.reply(body)
        prompt = "".join(
            content_text(m.get("content")) for m in body.get("messages", []) if isinstance(m, dict)
        )
        prompt_tokens, completion_tokens = scripted.usage or (
            _count_tokens(prompt),
            _count_tokens(text),
        )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "gpt-fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _openai_embeddings(self, body: dict[str, Any], scripted: Reply) -> dict[str, Any]:
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("fake API: input must be a string or a list of strings")
        if any(t == "" for t in texts):
            raise ValueError("fake API: input must not contain empty strings")
        dimension = body.get("dimensions") or self.embedding_dimension
        if scripted.vectors is not None:
            vectors = scripted.vectors
        else:
            vectors = [fake_embedding(t, int(dimension)) for t in texts]
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _b64_floats(vec) if as_base64 else vec,
            }
            for i, vec in enumerate(vectors)
        ]
        tokens = sum(_count_tokens(t) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model", "text-embedding-fake"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _anthropic_request_problem(
    request: web.Request, body: dict[str, Any]
) -> tuple[int, str] | None:
    """What the real Messages API would reject in this request (status, message), if anything."""
    if not (request.headers.get("x-api-key") or request.headers.get("authorization")):
        return 401, "x-api-key header is required"
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return 400, f"{name}: Field required"
    version = request.headers.get("anthropic-version", "")
    if version >= ANTHROPIC_NO_SAMPLING_VERSION:
        for name in _ANTHROPIC_SAMPLING_PARAMS:
            if name in body:
                return 400, f"{name}: Extra inputs are not permitted"
    return None


def _b64_floats(vector: list[float]) -> str:
    # The OpenAI SDK asks for base64 by default: little-endian float32, base64-encoded.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    error_type = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _openai_error(status: int, message: str) -> dict[str, Any]:
    error_type, code = _OPENAI_ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def _error_body(endpoint: str, status: int, message: str) -> dict[str, Any]:
    if endpoint == "messages":
        return _anthropic_error(status, message)
    return _openai_error(status, message)


def fake_api_fixture(
    *,
    name: str = "fake_api",
    reply: Callable[[Any], str] = echo_reply,
    embedding_dimension: int = DEFAULT_EMBEDDING_DIMENSION,
) -> Any:
    """A function-scoped pytest fixture yielding a started :class:`FakeAPIServer`.

    In a test module: ``fake_api = fake_api_fixture()`` then ``async def
    test_x(fake_api: FakeAPIServer)``. Pass ``name=`` to register it under another name
    (assign it to a module variable of that name).
    """

    @pytest_asyncio.fixture(name=name)
    async def _fake_api() -> AsyncIterator[FakeAPIServer]:
        async with FakeAPIServer(reply=reply, embedding_dimension=embedding_dimension) as server:
            yield server

    return _fake_api
