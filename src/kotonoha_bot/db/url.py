"""``DatabaseURL``: the one place a database URL is parsed, shown, compared and converted.

Every command, setting and tool turns its URL text into a ``DatabaseURL`` once, at the
edge, and passes the object (or its ``display()``) on. Parsing is strict because a
mistyped URL is exactly where a password leaks: ``kotonoha:PW@localhost/db`` (no
scheme), ``postgresql//…``, ``postgres:/…``, an unencoded ``/ ? #`` in the password
(which moves the rest of the password into the path, query or fragment, where no
redactor looks for it), ``[::1`` or ``host:notaport`` (whose stdlib errors quote the
text). Each of these is refused with :class:`InvalidDatabaseURLError` whose message
never contains the URL's password: it quotes only :func:`mask_url`'s rendering, which
replaces everything between the scheme and the last ``@`` that is not the user name.

Forms accepted (DESIGN.md): ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``,
``postgresql://user:pass@host:5432/db`` (also ``postgres://``, ``postgresql+driver://``,
an empty host with ``?host=/unix/socket/dir``, and percent-encoded user and password).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode

from kotonoha_bot.errors import InvalidDatabaseURLError
from kotonoha_bot.redact import QUERY_SECRET_KEYS, mask_url, password_candidates
from kotonoha_bot.redact import SCHEME_RE as _SCHEME_RE

__all__ = ["DatabaseURL", "InvalidDatabaseURLError", "mask_url", "password_candidates"]

SCHEMES = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}
_FORMS = (
    "use sqlite:///relative.db, sqlite:////absolute/path.db or"
    " postgresql://user@host:5432/database (a password goes after the user and a colon)"
)


def _fail(text: str, problem: str) -> InvalidDatabaseURLError:
    return InvalidDatabaseURLError(f"invalid database URL {mask_url(text)!r}: {problem}")


@dataclass(frozen=True, repr=False)
class DatabaseURL:
    """A parsed database URL. ``str()`` and ``repr()`` never show the password."""

    backend: str  # "sqlite" | "postgresql"
    path: Path | None = None  # SQLite file
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    database: str | None = None
    query: tuple[tuple[str, str], ...] = ()
    written_scheme: str = ""

    # --- parsing --------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | DatabaseURL) -> DatabaseURL:
        """Parse strictly, or raise :class:`InvalidDatabaseURLError` (password masked)."""
        if isinstance(text, DatabaseURL):
            return text
        if not isinstance(text, str) or not text.strip():
            raise InvalidDatabaseURLError(f"empty database URL: {_FORMS}")
        if text != text.strip() or any(ord(c) < 32 for c in text):
            raise _fail(text, "it contains spaces or control characters at its ends or inside")
        match = _SCHEME_RE.match(text)
        if match is None or match["sep"] != "://":
            raise _fail(text, f"it does not start with a scheme and '://'; {_FORMS}")
        written = match["scheme"].lower()
        backend = SCHEMES.get(written.split("+", 1)[0])
        if backend is None:
            raise _fail(text, "the scheme must be sqlite or postgresql")
        rest = text[match.end() :]
        if backend == "sqlite":
            return cls._parse_sqlite(text, rest, written)
        return cls._parse_postgres(text, rest, written)

    @classmethod
    def _parse_sqlite(cls, text: str, rest: str, written: str) -> DatabaseURL:
        if not rest.startswith("/"):
            raise _fail(
                text,
                "a SQLite URL has three slashes: sqlite:///relative.db or"
                " sqlite:////absolute/path.db",
            )
        name = rest[1:].split("?", 1)[0]
        if "#" in name:
            raise _fail(text, "a SQLite path must not contain '#'")
        if not name or name == ":memory:":
            raise _fail(text, "a SQLite URL must name a file (in-memory databases are not kept)")
        return cls("sqlite", path=Path(name), written_scheme=written)

    @classmethod
    def _parse_postgres(cls, text: str, rest: str, written: str) -> DatabaseURL:
        end = len(rest)
        for c in "/?#":
            i = rest.find(c)
            if 0 <= i < end:
                end = i
        authority, tail = rest[:end], rest[end:]
        later_at = tail.find("@")
        if later_at >= 0 and "=" not in tail[:later_at]:
            raise _fail(
                text,
                "the user or password contains '/', '?' or '#'; percent-encode them"
                " (/ as %2F, ? as %3F, # as %23)",
            )
        if "#" in tail:
            raise _fail(text, "a database URL has no '#' part; percent-encode '#' as %23")
        userinfo, at, hostinfo = authority.rpartition("@")
        if not at:
            userinfo, hostinfo = "", authority
        if "@" in userinfo:
            raise _fail(text, "the user or password contains '@'; percent-encode it as %40")
        user_raw, colon, password_raw = userinfo.partition(":")
        host, port = cls._host_port(text, hostinfo)
        path, _, query_text = tail.partition("?")
        database = unquote(path[1:]) if path.startswith("/") else None
        if path and "/" in path[1:]:
            raise _fail(text, "the database name must not contain '/'")
        query: list[tuple[str, str]] = []
        if query_text:
            try:
                query = parse_qsl(query_text, keep_blank_values=True, strict_parsing=True)
            except ValueError:
                raise _fail(text, "the part after '?' is not key=value&key=value") from None
        return cls(
            "postgresql",
            user=unquote(user_raw) if user_raw else None,
            password=unquote(password_raw) if colon else None,
            host=host,
            port=port,
            database=database or None,
            query=tuple(query),
            written_scheme=written,
        )

    @staticmethod
    def _host_port(text: str, hostinfo: str) -> tuple[str | None, int | None]:
        if hostinfo.startswith("["):
            close = hostinfo.find("]")
            if close < 0:
                raise _fail(text, "an IPv6 host opened with '[' is not closed with ']'")
            host, after = hostinfo[1:close], hostinfo[close + 1 :]
            if after and not after.startswith(":"):
                raise _fail(text, "unexpected text after the IPv6 host's ']'")
            port_text = after[1:] if after else None
        else:
            if "[" in hostinfo or "]" in hostinfo:
                raise _fail(text, "brackets are only allowed around an IPv6 host")
            if hostinfo.count(":") > 1:
                raise _fail(text, "put an IPv6 host in brackets: [::1]:5432")
            host, colon, port_text_ = hostinfo.partition(":")
            port_text = port_text_ if colon else None
        port: int | None = None
        if port_text is not None:
            # Never quote the port: in `user:password/db` (no '@') it is the password.
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                masked = text.replace(f":{port_text}", ":***", 1)
                raise _fail(masked, "the port must be a number from 1 to 65535")
            port = int(port_text)
        return (unquote(host) or None), port

    # --- showing --------------------------------------------------------------------

    def display(self) -> str:
        """The URL fit for printing and logs: the password (if any) as ``***``."""
        if self.backend == "sqlite":
            return f"sqlite:///{self.path}"
        return self._render(show_password=False)

    def __str__(self) -> str:
        return self.display()

    def __repr__(self) -> str:
        return f"DatabaseURL({self.display()!r})"

    @property
    def identity(self) -> str:
        """A stable, password-free name: two URLs for the same database compare equal."""
        if self.backend == "sqlite":
            assert self.path is not None
            return f"sqlite:///{self.path.resolve()}"
        host = self.host or dict(self.query).get("host") or "localhost"
        return f"postgresql://{self.user or ''}@{host}:{self.port or 5432}/{self.database or ''}"

    @property
    def label(self) -> str:
        """A file-name-safe name for backups: the file stem or database name and a hash.

        The hash of :attr:`identity` keeps two databases with the same stem (two
        ``kotonoha.db`` in different folders) from rotating each other's backups.
        """
        if self.backend == "sqlite":
            assert self.path is not None
            name = self.path.stem
        else:
            name = self.database or self.user or "postgres"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "kotonoha"
        digest = hashlib.blake2b(self.identity.encode(), digest_size=4).hexdigest()
        return f"{name}-{digest}"

    @property
    def secrets(self) -> list[str]:
        """The password (and password-like query values) for the log redactor."""
        values = [self.password] if self.password else []
        values += [v for k, v in self.query if k.lower() in QUERY_SECRET_KEYS and v]
        return values

    # --- converting -----------------------------------------------------------------

    def dsn(self) -> str:
        """The full ``postgresql://`` URL for asyncpg, password included (never print it)."""
        if self.backend != "postgresql":
            raise InvalidDatabaseURLError(f"{self.display()} is not a PostgreSQL URL")
        return self._render(show_password=True)

    def libpq(self) -> tuple[str, dict[str, str]]:
        """A libpq URI without the password, and the ``PGPASSWORD`` that carries it."""
        secrets = self.secrets
        env = {"PGPASSWORD": secrets[0]} if secrets else {}
        return self._render(show_password=None), env

    def _render(self, *, show_password: bool | None) -> str:
        """``show_password``: True (DSN), False (``***``), None (left out: libpq)."""
        auth = ""
        if self.user is not None or (self.password is not None and show_password is not None):
            auth = quote(self.user or "", safe="")
            if self.password is not None and show_password is not None:
                if show_password:
                    auth += ":" + quote(self.password, safe="")
                elif self.password:
                    auth += ":***"
            auth += "@"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{self.port}" if self.port is not None else ""
        database = "/" + quote(self.database, safe="") if self.database is not None else "/"
        query = [
            (k, "***" if k.lower() in QUERY_SECRET_KEYS and show_password is False else v)
            for k, v in self.query
            if show_password is not None or k.lower() not in QUERY_SECRET_KEYS
        ]
        q = "?" + urlencode(query, safe="/*") if query else ""
        scheme = "postgresql" if show_password is not False else self.written_scheme or "postgresql"
        return f"{scheme}://{auth}{host}{port}{database}{q}"
