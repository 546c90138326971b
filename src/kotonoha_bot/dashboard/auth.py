"""Who may use the dashboard: one operator token, browser sessions, CSRF, login limits.

- **Token.** ``DASHBOARD_TOKEN`` (16+ characters) is the only credential. It is
  compared in constant time (digests of equal length) and never rendered or logged.
- **Browser sessions.** Logging in with the token sets a random session id in an
  ``HttpOnly``, ``SameSite=Strict`` cookie (``Secure`` over HTTPS); sessions live in
  this process's memory for :data:`SESSION_SECONDS` (a restart logs everyone out).
- **Scripts** send ``Authorization: Bearer <token>`` instead; a browser never attaches
  that header by itself, so such requests need no CSRF token.
- **CSRF.** Every state-changing request of a browser session carries the session's
  CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``), and a request
  whose ``Origin`` names another site is refused even with it. The login form carries
  a token of its own (double submit: cookie and field must agree).
- **Login limits.** Wrong tokens (from the form or a bearer header) count per client
  address: :data:`LOGIN_ATTEMPTS` in :data:`LOGIN_WINDOW` seconds, then that address
  waits; :data:`GLOBAL_ATTEMPTS` wrong tokens from everyone together pause every login
  for the rest of the window (a token of 16+ random characters cannot be guessed at
  that pace).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kotonoha_bot.errors import ConfigError

SESSION_COOKIE = "kotonoha_dashboard"
LOGIN_COOKIE = "kotonoha_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 12 * 3600.0
MIN_TOKEN_CHARS = 16
LOGIN_ATTEMPTS = 5
LOGIN_WINDOW = 300.0
GLOBAL_ATTEMPTS = 50
MAX_SESSIONS = 1000


def check_token(token: str | None) -> str:
    """The configured token, or ConfigError saying what is wrong with it."""
    if not token or not token.strip():
        raise ConfigError(
            "DASHBOARD_TOKEN is not set: the dashboard never runs without a token"
            " (set one of 16+ characters, or run `kotonoha dashboard --generate-token`)"
        )
    if len(token.strip()) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"DASHBOARD_TOKEN is too short ({len(token.strip())} characters;"
            f" at least {MIN_TOKEN_CHARS})"
        )
    return token.strip()


def generate_token() -> str:
    """A fresh random token (32 URL-safe characters)."""
    return secrets.token_urlsafe(24)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


@dataclass
class WebSession:
    """One logged-in browser."""

    csrf: str
    expires: float


@dataclass
class LoginLimiter:
    """Counts wrong tokens per client address and in total, over a sliding window."""

    attempts: int = LOGIN_ATTEMPTS
    window: float = LOGIN_WINDOW
    global_attempts: int = GLOBAL_ATTEMPTS
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _all: deque[float] = field(default_factory=deque)

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def retry_after(self, client: str) -> float:
        """Seconds this client must wait before trying again (0: go ahead)."""
        now = self.clock()
        self._trim(self._all, now)
        waits = []
        if len(self._all) >= self.global_attempts:
            waits.append(self._all[0] + self.window - now)
        mine = self._failures.get(client)
        if mine is not None:
            self._trim(mine, now)
            if len(mine) >= self.attempts:
                waits.append(mine[0] + self.window - now)
            elif not mine:
                del self._failures[client]
        return max(waits, default=0.0)

    def failed(self, client: str) -> None:
        """A wrong token from ``client``."""
        now = self.clock()
        if len(self._failures) > 10 * MAX_SESSIONS:  # bounded memory under a flood
            self._failures.clear()
        self._failures.setdefault(client, deque()).append(now)
        self._all.append(now)

    def succeeded(self, client: str) -> None:
        """The right token: this client's count starts over."""
        self._failures.pop(client, None)


class Auth:
    """The token, the browser sessions and the login limiter of one dashboard."""

    def __init__(self, token: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._token_digest = _digest(check_token(token))
        self._clock = clock
        self._sessions: dict[str, WebSession] = {}
        self.limiter = LoginLimiter(clock=clock)

    def token_matches(self, presented: str) -> bool:
        """Constant-time comparison with the configured token."""
        return hmac.compare_digest(_digest(presented.strip()), self._token_digest)

    def bearer(self, authorization: str | None) -> bool | None:
        """None without a bearer header; else whether it carries the token."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.token_matches(presented)

    def open_session(self) -> tuple[str, WebSession]:
        """A new browser session (id for the cookie, and its CSRF token)."""
        now = self._clock()
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            if len(self._sessions) >= MAX_SESSIONS:  # drop the oldest
                oldest = min(self._sessions, key=lambda k: self._sessions[k].expires)
                del self._sessions[oldest]
        sid = secrets.token_urlsafe(32)
        session = WebSession(csrf=secrets.token_urlsafe(32), expires=now + SESSION_SECONDS)
        self._sessions[sid] = session
        return sid, session

    def session(self, sid: str | None) -> WebSession | None:
        """The live session of a cookie value, or None."""
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[sid]
            return None
        return session

    def close_session(self, sid: str | None) -> None:
        """Log a browser out."""
        if sid:
            self._sessions.pop(sid, None)


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two CSRF tokens (both must be present)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())
