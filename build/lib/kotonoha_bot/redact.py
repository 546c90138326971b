"""Keep secrets out of everything we print: URLs, messages, tracebacks."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL_PASSWORD_RE = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@"
)
_QUERY_PASSWORD_RE = re.compile(r"(?i)([?&](?:password|passwd|pwd|sslpassword)=)[^&\s]*")

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


def safe_url(url: str) -> str:
    """A database URL fit for display: the password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    if "@" not in netloc:
        # Nothing to hide in the authority; keep the URL as written (urlunsplit would
        # turn sqlite:///x.db into sqlite:/x.db).
        return redact(url)
    userinfo, _, hostinfo = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"
    return redact(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))
