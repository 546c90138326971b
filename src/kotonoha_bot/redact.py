"""Keep secrets out of everything we print: URLs, messages, tracebacks.

One masking rule for URLs (:func:`mask_url`) serves well-formed and malformed text
alike, because a mistyped URL is where a password most often ends up in a message.
Database URLs are parsed by :class:`kotonoha_bot.db.url.DatabaseURL`, which uses the
same rule for its error messages.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

#: A scheme and what follows it (``://`` for a real URL; ``:`` or ``:/`` when mistyped).
SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)(?P<sep>:/{0,2})")
_URL_PASSWORD_RE = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@"
)
_QUERY_PASSWORD_RE = re.compile(r"(?i)([?&](?:password|passwd|pwd|sslpassword)=)[^&\s]*")

QUERY_SECRET_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword"})

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so :func:`redact` removes it wherever it appears."""
    if value and len(value) >= 4:
        _registered.add(value)


def redact(text: str) -> str:
    """Remove passwords in URLs and every registered secret from ``text``."""
    text = _URL_PASSWORD_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _QUERY_PASSWORD_RE.sub(r"\1***", text)
    for secret in sorted(_registered, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def mask_url(text: str) -> str:
    """``text`` with anything that may be a password replaced by ``***``.

    Works on malformed URLs too: everything between the scheme (only a real
    ``scheme://``) and the *last* ``@`` is user information; only the part before its
    first ``:`` (the user name) is kept, and only when it holds no ``/ ? #`` (else it
    may be half a password). Password query parameters are masked as well.
    """
    masked = text
    at = text.rfind("@")
    if at >= 0:
        match = SCHEME_RE.match(text)
        start = match.end() if match and match["sep"] == "://" and match.end() <= at else 0
        userinfo = text[start:at]
        user, colon, _ = userinfo.partition(":")
        if any(c in user for c in "/?#") or (not colon and any(c in userinfo for c in "/?#")):
            shown = "***"
        elif colon:
            shown = f"{user}:***"
        else:
            shown = user
        masked = text[:start] + shown + text[at:]
    return _QUERY_PASSWORD_RE.sub(r"\1***", masked)


def safe_url(url: str) -> str:
    """A URL fit for display (database, LLM or embedding server): no password in it."""
    return redact(mask_url(url))


def password_candidates(text: str | None) -> list[str]:
    """Every string a (possibly malformed) URL's password could be, for the log redactor.

    For a well-formed URL that is its password, as written and percent-decoded; for a
    malformed one also whatever follows the first ``:`` of its user information.
    """
    if not text:
        return []
    found: list[str] = []
    at = text.rfind("@")
    if at >= 0:
        match = SCHEME_RE.match(text)
        start = match.end() if match and match["sep"] == "://" and match.end() <= at else 0
        userinfo = text[start:at]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
            if start == 0:  # no real scheme: `postgres:/user:password@...`
                found.append(userinfo.rsplit(":", 1)[1])
    else:
        # `scheme://user:password/db` without '@' reads as host:port; a port that is
        # not a number may be the password.
        match = SCHEME_RE.match(text)
        if match and match["sep"] == "://":
            authority = re.split(r"[/?#]", text[match.end() :], maxsplit=1)[0]
            port = authority.rpartition(":")[2] if ":" in authority else ""
            if port and not port.isdigit() and "]" not in port:
                found.append(port)
    for key, value in _query_pairs(text):
        if key.lower() in QUERY_SECRET_KEYS:
            found.append(value)
    out: list[str] = []
    for value in found:
        for v in (value, unquote(value)):
            if v and v not in out:
                out.append(v)
    return out


def _query_pairs(text: str) -> list[tuple[str, str]]:
    if "?" not in text:
        return []
    query = text.split("?", 1)[1].split("#", 1)[0]
    return [tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&")]  # type: ignore[misc]
