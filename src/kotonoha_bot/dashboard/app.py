"""The dashboard's web application: routes, the request guard, rendering.

Every route but ``/login`` and ``/static`` passes :meth:`Dashboard.guard`, which
(1) authenticates (session cookie or bearer token, see :mod:`.auth`), (2) for a
state-changing request of a browser session checks the CSRF token and the Origin,
(3) resolves the ``{guild_id}`` of the URL against the guilds this dashboard may show
(``DASHBOARD_GUILDS``; a guild outside it is "not found"; a guild without data is an
empty memory page, where its first document can be uploaded), and (4) picks the
language. Pages then ask storage only with that guild id, so an object of another
guild named in a URL is not found either.

Responses carry a strict Content-Security-Policy (scripts and styles from this origin
only; htmx is a vendored static file), ``X-Frame-Options: DENY``, ``no-store``
caching and no referrer. No page renders a secret: settings are shown by name, the
database location without its password, and errors through :func:`redact`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kotonoha_bot.chat.service import ChatService
from kotonoha_bot.config import Settings
from kotonoha_bot.dashboard import auth as authn
from kotonoha_bot.dashboard.i18n import negotiate, translator
from kotonoha_bot.dashboard.status import BotLink
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.models import utcnow
from kotonoha_bot.redact import redact
from kotonoha_bot.text import human_size

log = logging.getLogger("kotonoha_bot.dashboard")

HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'; connect-src 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class Backend:
    """What the dashboard works on; the same objects the bot uses when it runs inside it."""

    db: DatabaseProtocol
    settings: Settings
    url: str
    embedder: Callable[[], EmbeddingProvider | None] = lambda: None
    chat: ChatService | None = None
    bot: BotLink | None = None


@dataclass
class Page:
    """One authorised request: who, in which language, for which guild."""

    request: Request
    lang: str
    t: Callable[..., str]
    csrf: str
    bearer: bool
    guild_id: int | None = None
    form: FormData | None = None


@dataclass
class BackupJob:
    """The "back up now" task (one at a time per dashboard)."""

    task: asyncio.Task[Path] | None = None
    started: datetime | None = None
    result: str = ""
    error: str = ""
    history: list[str] = field(default_factory=list)


Handler = Callable[[Page], Awaitable[Response]]


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Dashboard:
    """The application state shared by the routes."""

    def __init__(self, backend: Backend, token: str) -> None:
        self.backend = backend
        self.auth = authn.Auth(token)
        self.allowed = backend.settings.dashboard_guild_ids()
        self.backup = BackupJob()
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["size"] = human_size
        self.env.filters["q"] = lambda v: quote(str(v), safe="")
        self.env.globals["max_upload"] = human_size(backend.settings.kb_add_max_bytes)

    @property
    def db(self) -> DatabaseProtocol:
        return self.backend.db

    # --- rendering ----------------------------------------------------------------

    def render(self, page: Page, template: str, status: int = 200, **context: Any) -> Response:
        """An HTML page (or a fragment for htmx requests of ``*_fragment`` templates)."""
        html = self.env.get_template(template).render(
            t=page.t,
            lang=page.lang,
            csrf=page.csrf,
            guild_id=page.guild_id,
            path=page.request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def error(self, page: Page, status: int, message: str) -> Response:
        if "application/json" in page.request.headers.get("accept", "") or page.bearer:
            return JSONResponse({"error": message}, status_code=status)
        return self.render(page, "error.html", status=status, message=message)

    # --- the guard ------------------------------------------------------------------

    def guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Authenticate, check CSRF and the guild, then call ``handler``."""

        async def endpoint(request: Request) -> Response:
            lang = negotiate(request.headers.get("accept-language"))
            t = translator(lang)
            client = _client(request)
            bearer = self.auth.bearer(request.headers.get("authorization"))
            session = self.auth.session(request.cookies.get(authn.SESSION_COOKIE))
            if bearer is False:
                wait = self.auth.limiter.retry_after(client)
                if wait <= 0:
                    self.auth.limiter.failed(client)
                return _refused(request, 429 if wait > 0 else 401, wait)
            if bearer is None and session is None:
                # A browser page goes to the login form; scripts (/api) and htmx
                # fragments get a plain 401 they can act on.
                if (
                    request.method == "GET"
                    and "hx-request" not in request.headers
                    and not request.url.path.startswith("/api/")
                ):
                    target = quote(request.url.path, safe="/")
                    return RedirectResponse(f"/login?next={target}", status_code=303)
                return _refused(request, 401, 0)
            page = Page(request, lang, t, session.csrf if session else "", bool(bearer))
            if request.method in _STATE_CHANGING:
                page.form = await request.form(
                    max_files=1, max_part_size=self.backend.settings.kb_add_max_bytes + 1024
                )
                if not bearer and not self._csrf_ok(request, page, session):
                    log.warning(
                        "dashboard: CSRF check failed for %s %s", request.method, request.url.path
                    )
                    return self.error(page, 403, t("csrf_failed"))
            if "guild_id" in request.path_params:
                guild = _int(request.path_params["guild_id"])
                if guild is None or (self.allowed is not None and guild not in self.allowed):
                    return self.error(page, 404, t("not_found"))
                page.guild_id = guild
            try:
                return await handler(page)
            except KotonohaError as exc:
                log.warning("dashboard: %s %s: %s", request.method, request.url.path, exc)
                return self.error(page, 400, redact(f"{type(exc).__name__}: {exc}"))

        return endpoint

    def _csrf_ok(self, request: Request, page: Page, session: authn.WebSession | None) -> bool:
        if session is None:
            return False
        origin = request.headers.get("origin")
        if origin and origin != "null" and not _same_origin(origin, request):
            return False
        presented = request.headers.get(authn.CSRF_HEADER)
        if presented is None and page.form is not None:
            value = page.form.get(authn.CSRF_FIELD)
            presented = value if isinstance(value, str) else None
        return authn.same_token(presented, session.csrf)

    def allows(self, guild_id: int) -> bool:
        """Whether ``DASHBOARD_GUILDS`` lets this dashboard show the guild."""
        return self.allowed is None or guild_id in self.allowed

    # --- login ------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        lang = negotiate(request.headers.get("accept-language"))
        return self._login_page(request, lang, "", 200)

    def _login_page(self, request: Request, lang: str, message: str, status: int) -> Response:
        nonce = authn.generate_token()
        page = Page(request, lang, translator(lang), "", False)
        response = self.render(
            page,
            "login.html",
            status=status,
            login_nonce=nonce,
            message=message,
            next=_safe_next(request.query_params.get("next")),
        )
        response.set_cookie(
            authn.LOGIN_COOKIE,
            nonce,
            max_age=900,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/login",
        )
        return response

    async def login(self, request: Request) -> Response:
        lang = negotiate(request.headers.get("accept-language"))
        t = translator(lang)
        client = _client(request)
        wait = self.auth.limiter.retry_after(client)
        if wait > 0:
            response = self._login_page(
                request, lang, t("login_limited", seconds=int(wait) + 1), 429
            )
            response.headers["retry-after"] = str(int(wait) + 1)
            return response
        form = await request.form(max_files=0)
        nonce = form.get("login_nonce")
        if not authn.same_token(
            nonce if isinstance(nonce, str) else None, request.cookies.get(authn.LOGIN_COOKIE)
        ):
            return self._login_page(request, lang, t("login_expired"), 403)
        token = form.get("token")
        if not isinstance(token, str) or not self.auth.token_matches(token):
            self.auth.limiter.failed(client)
            log.warning("dashboard: wrong token from %s", client)
            return self._login_page(request, lang, t("login_bad"), 401)
        self.auth.limiter.succeeded(client)
        sid, _ = self.auth.open_session()
        target = form.get("next")
        response = RedirectResponse(
            _safe_next(target if isinstance(target, str) else None), status_code=303
        )
        response.set_cookie(
            authn.SESSION_COOKIE,
            sid,
            max_age=int(authn.SESSION_SECONDS),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        response.delete_cookie(authn.LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, page: Page) -> Response:
        self.auth.close_session(page.request.cookies.get(authn.SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(authn.SESSION_COOKIE, path="/")
        return response


def create_app(backend: Backend, token: str) -> Starlette:
    """The dashboard's ASGI application (``token``: the checked ``DASHBOARD_TOKEN``).

    ``app.state.dashboard`` is the :class:`Dashboard` (its auth, backup job, backend).
    """
    from kotonoha_bot.dashboard import views

    dash = Dashboard(backend, token)

    def g(view: Callable[[Dashboard, Page], Awaitable[Response]]) -> Any:
        return dash.guard(functools.partial(view, dash))

    routes = [
        Route("/login", dash.login_form, methods=["GET"]),
        Route("/login", dash.login, methods=["POST"]),
        Route("/logout", dash.guard(dash.logout), methods=["POST"]),
        Route("/", g(views.home), methods=["GET"]),
        Route("/status", g(views.status_page), methods=["GET"]),
        Route("/api/status", g(views.status_json), methods=["GET"]),
        Route("/status/pause", g(views.pause), methods=["POST"]),
        Route("/status/resume", g(views.resume), methods=["POST"]),
        Route("/status/backup", g(views.backup_now), methods=["POST"]),
        Route("/status/backup", g(views.backup_state), methods=["GET"]),
        Route("/status/reindex", g(views.reindex), methods=["POST"]),
        Route("/guilds", g(views.guilds), methods=["GET"]),
        Route("/guilds/{guild_id}", g(views.guild_memory), methods=["GET"]),
        Route("/guilds/{guild_id}/upload", g(views.upload), methods=["POST"]),
        Route("/guilds/{guild_id}/sources/{source_id}", g(views.source), methods=["GET"]),
        Route(
            "/guilds/{guild_id}/sources/{source_id}/delete",
            g(views.delete_source),
            methods=["POST"],
        ),
        Route(
            "/guilds/{guild_id}/chunks/{chunk_id}/delete", g(views.delete_chunk), methods=["POST"]
        ),
        Route("/guilds/{guild_id}/memories", g(views.memories), methods=["GET"]),
        Route(
            "/guilds/{guild_id}/memories/{memory_id}/delete",
            g(views.delete_memory),
            methods=["POST"],
        ),
        Route("/guilds/{guild_id}/search", g(views.search), methods=["GET"]),
        Route("/guilds/{guild_id}/conversations", g(views.conversations), methods=["GET"]),
        Route(
            "/guilds/{guild_id}/conversations/{session_key}",
            g(views.transcript),
            methods=["GET"],
        ),
        Route(
            "/guilds/{guild_id}/conversations/{session_key}/delete",
            g(views.delete_conversation),
            methods=["POST"],
        ),
        Route("/usage", g(views.usage), methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    app.state.dashboard = dash
    return app


# --- helpers ---------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    """A stored time for display (UTC, to the minute)."""
    if value is None:
        return "—"
    return value.strftime("%Y-%m-%d %H:%M UTC")


def _int(value: Any) -> int | None:
    text = str(value)
    if not text.isdigit() or len(text) > 19:
        return None
    number = int(text)
    return number if number < 2**63 else None


def _client(request: Request) -> str:
    """The peer address (never a forwarded-for header: that is the caller's claim)."""
    return request.client.host if request.client else "?"


def _same_origin(origin: str, request: Request) -> bool:
    parts = urlsplit(origin)
    return parts.scheme == request.url.scheme and parts.netloc == request.url.netloc


def _safe_next(target: str | None) -> str:
    """Only a local path (never another site) is a place to return to after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/status"
    return target


def _refused(request: Request, status: int, wait: float) -> Response:
    headers = {"www-authenticate": 'Bearer realm="kotonoha-dashboard"'}
    if wait > 0:
        headers["retry-after"] = str(int(wait) + 1)
    return JSONResponse(
        {"error": "too many attempts" if status == 429 else "authentication required"},
        status_code=status,
        headers=headers,
    )


def now_text() -> str:
    """The current time as the pages show it."""
    return _when(utcnow())
