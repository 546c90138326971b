"""The dashboard's security as an attacker would probe it, over real HTTP (httpx).

Refused without a token, a wrong token, too many attempts, CSRF on every state change,
another guild's ids in URLs, and no secret in any page. Each test also checks that the
refused request changed nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import httpx
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.dashboard.app import Backend
from kotonoha_bot.dashboard.auth import LOGIN_ATTEMPTS
from kotonoha_bot.dashboard.example import FOREST, OWLS
from kotonoha_bot.dashboard.server import DashboardServer
from kotonoha_bot.errors import ConfigError
from tests.dashboard.conftest import TOKEN, Running, dashboard_settings

#: (method, path template) of every route; {g} guild, {s} source, {c} chunk, {m} memory,
#: {k} session key.
ROUTES = [
    ("GET", "/"),
    ("GET", "/status"),
    ("GET", "/api/status"),
    ("GET", "/status/backup"),
    ("GET", "/guilds"),
    ("GET", "/guilds/{g}"),
    ("GET", "/guilds/{g}/sources/{s}"),
    ("GET", "/guilds/{g}/memories"),
    ("GET", "/guilds/{g}/search?q=test"),
    ("GET", "/guilds/{g}/conversations"),
    ("GET", "/guilds/{g}/conversations/{k}"),
    ("GET", "/usage"),
    ("POST", "/logout"),
    ("POST", "/status/pause"),
    ("POST", "/status/resume"),
    ("POST", "/status/backup"),
    ("POST", "/status/reindex"),
    ("POST", "/guilds/{g}/upload"),
    ("POST", "/guilds/{g}/sources/{s}/delete"),
    ("POST", "/guilds/{g}/chunks/{c}/delete"),
    ("POST", "/guilds/{g}/memories/{m}/delete"),
    ("POST", "/guilds/{g}/conversations/{k}/delete"),
]
STATE_CHANGING = [(m, p) for m, p in ROUTES if m == "POST" and p != "/logout"]


async def ids(d: Running, guild: int = FOREST) -> dict[str, object]:
    """Real ids of one guild's objects, for the URL templates."""
    source = (await d.db.source_summaries(guild))[0].source
    assert source.source_id is not None
    chunk = (await d.db.list_chunk_page(source.source_id, guild_id=guild))[0]
    memory = (await d.db.list_memories(guild_id=guild))[0]
    session = (await d.db.find_sessions(guild_id=guild))[0]
    return {
        "g": guild,
        "s": source.source_id,
        "c": chunk.chunk_id,
        "m": memory.memory_id,
        "k": session.session_key,
    }


async def fingerprint(d: Running) -> tuple[object, ...]:
    """What a refused request must not have changed."""
    stats = await d.db.stats()
    memories = len(await d.db.list_memories(guild_id=FOREST)) + len(
        await d.db.list_memories(guild_id=OWLS)
    )
    backup = await d.db.last_backup()
    return (
        stats.sessions,
        stats.messages,
        stats.sources,
        stats.chunks,
        memories,
        (await d.db.pause_state()).paused,
        backup,
    )


async def log_in(client: httpx.AsyncClient) -> str:
    """Log in through the form like a browser; returns the session's CSRF token."""
    form = await client.get("/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    done = await client.post(
        "/login", data={"login_nonce": nonce.group(1), "token": TOKEN, "next": "/status"}
    )
    assert done.status_code == 303, done.text
    page = await client.get("/status")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    return csrf.group(1)


async def test_every_route_refuses_a_request_without_the_token(dashboard: Running) -> None:
    before = await fingerprint(dashboard)
    values = await ids(dashboard)
    async with dashboard.client() as anonymous:
        for method, template in ROUTES:
            path = template.format(**values)
            response = await anonymous.request(method, path, data={"x": "1"})
            if method == "GET" and not path.startswith("/api"):
                assert response.status_code == 303, path
                assert response.headers["location"].startswith("/login?next=")
            else:
                assert response.status_code == 401, (method, path, response.status_code)
            # Nothing of the guild's data leaks into a refusal.
            assert "オフ会" not in response.text and "ミナ" not in response.text
        htmx = await anonymous.get("/status", headers={"HX-Request": "true"})
        assert htmx.status_code == 401
    assert await fingerprint(dashboard) == before


async def test_a_wrong_bearer_token_is_refused_then_rate_limited(dashboard: Running) -> None:
    async with dashboard.client(headers={"Authorization": "Bearer not-the-token-xxxxxxxx"}) as c:
        codes = [(await c.get("/api/status")).status_code for _ in range(LOGIN_ATTEMPTS)]
        assert codes == [401] * LOGIN_ATTEMPTS
        limited = await c.get("/api/status")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    # The limit is on the client address: the right token waits too, then works later.
    async with dashboard.client(bearer=True) as c:
        assert (await c.get("/api/status")).status_code == 200  # a right bearer is not limited


async def test_the_login_form_is_rate_limited_and_sets_a_strict_cookie(
    dashboard: Running,
) -> None:
    async with dashboard.client() as c:
        for _ in range(LOGIN_ATTEMPTS):
            form = await c.get("/login")
            nonce = re.search(r'name="login_nonce" value="([^"]+)"', form.text)
            assert nonce is not None
            bad = await c.post("/login", data={"login_nonce": nonce.group(1), "token": "guess"})
            assert bad.status_code == 401
            assert "kotonoha_dashboard" not in bad.headers.get("set-cookie", "")
        form = await c.get("/login")
        nonce = re.search(r'name="login_nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        right_but_late = await c.post(
            "/login", data={"login_nonce": nonce.group(1), "token": TOKEN}
        )
        assert right_but_late.status_code == 429
        assert "retry-after" in right_but_late.headers
    dashboard.server.app.state.dashboard.auth.limiter.succeeded("127.0.0.1")  # the wait ends
    async with dashboard.client() as c:
        await log_in(c)
        cookie = next(
            h
            for k, h in c.cookies.jar._cookies.items()  # type: ignore[attr-defined]
        )
        assert cookie  # a session cookie was set
        form = await c.get("/login")
        nonce = re.search(r'name="login_nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        ok = await c.post("/login", data={"login_nonce": nonce.group(1), "token": TOKEN})
        header = ok.headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=strict" in header and "path=/" in header


async def test_a_login_without_the_forms_own_token_is_refused(dashboard: Running) -> None:
    async with dashboard.client() as c:
        forged = await c.post("/login", data={"login_nonce": "forged", "token": TOKEN})
        assert forged.status_code == 403
        assert "kotonoha_dashboard" not in forged.headers.get("set-cookie", "")


async def test_every_state_changing_route_rejects_a_missing_wrong_or_cross_site_csrf(
    dashboard: Running,
) -> None:
    before = await fingerprint(dashboard)
    values = await ids(dashboard)
    async with dashboard.client() as c:
        csrf = await log_in(c)
        for _method, template in STATE_CHANGING:
            path = template.format(**values)
            missing = await c.post(path, data={})
            # One character changed (never to itself: a token may start with "x").
            forged = ("y" if csrf[0] == "x" else "x") + csrf[1:]
            wrong = await c.post(path, data={"csrf_token": forged})
            cross = await c.post(
                path, data={"csrf_token": csrf}, headers={"Origin": "https://evil.example"}
            )
            assert (missing.status_code, wrong.status_code, cross.status_code) == (
                403,
                403,
                403,
            ), path
        assert await fingerprint(dashboard) == before
        # The same request with the session's token goes through.
        done = await c.post("/status/pause", data={"csrf_token": csrf})
        assert done.status_code == 303
        assert (await dashboard.db.pause_state()).paused
        header = await c.post("/status/resume", headers={"X-CSRF-Token": csrf})
        assert header.status_code == 303
        assert not (await dashboard.db.pause_state()).paused


async def test_another_guilds_objects_are_not_found_through_this_guilds_urls(
    dashboard: Running,
) -> None:
    forest = await ids(dashboard, FOREST)
    before = await fingerprint(dashboard)
    as_owls = {**forest, "g": OWLS}  # the forest's ids under the owls' guild
    async with dashboard.client(bearer=True) as c:
        for method, template in ROUTES:
            if not any(f"{{{k}}}" in template for k in "scmk"):
                continue  # no object id in this URL
            path = template.format(**as_owls)
            response = await c.request(method, path)
            assert response.status_code == 404, (method, path, response.status_code)
            assert "オフ会" not in response.text
        # A guild id that is not a number, or out of range, is not found either.
        for bad in ("abc", "-1", str(2**63), "1" * 30):
            assert (await c.get(f"/guilds/{bad}")).status_code == 404
    assert await fingerprint(dashboard) == before


async def test_dashboard_guilds_hides_every_other_guild(
    dashboard: Running, tmp_path: Path, database_url: str
) -> None:
    settings = dashboard_settings(tmp_path, dashboard_guilds=str(OWLS))
    backend = Backend(dashboard.db, settings, database_url, embedder=lambda: dashboard.embedder)
    async with (
        DashboardServer(backend, token=TOKEN, host="127.0.0.1", port=0) as server,
        httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c,
    ):
        assert (await c.get(f"/guilds/{FOREST}")).status_code == 404
        assert (await c.get(f"/guilds/{FOREST}/search?q=オフ会")).status_code == 404
        listing = await c.get("/guilds")
        assert str(OWLS) in listing.text and str(FOREST) not in listing.text
        usage = await c.get("/usage")
        assert "ことはの森" not in usage.text and f"#{FOREST}" not in usage.text


async def test_no_page_renders_a_secret(
    dashboard: Running, tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {
        "anthropic": "sk-ant-api03-SECRETanthropic0123456789",
        "openai": "sk-proj-SECRETopenai0123456789",
        "discord": "MTIzNDU2Nzg5.SECRETdiscord.0123456789",
        "health": "health-SECRET-0123456789",
        "password": "S3cretDbPassw0rd",
    }
    settings: Settings = dashboard_settings(
        tmp_path,
        anthropic_api_key=secrets["anthropic"],
        openai_api_key=secrets["openai"],
        discord_token=secrets["discord"],
        health_token=secrets["health"],
        database_read_url=f"postgresql://reader:{secrets['password']}@127.0.0.1:9/x",
    )
    # The URL the status page inspects (migration marker) carries a password too.
    url = f"postgresql://kotonoha:{secrets['password']}@127.0.0.1:9/kotonoha"
    backend = Backend(dashboard.db, settings, url, embedder=lambda: dashboard.embedder)
    values = await ids(dashboard)
    async with (
        DashboardServer(backend, token=TOKEN, host="127.0.0.1", port=0) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as c,
    ):
        await log_in(c)
        pages = [t.format(**values) for m, t in ROUTES if m == "GET"]
        pages += ["/login", f"/guilds/{FOREST}/search?q=オフ会&top_k=3", "/guilds/999/x"]
        for path in pages:
            response = await c.get(path)
            text = response.text
            for name, secret in [*secrets.items(), ("dashboard", TOKEN)]:
                assert secret not in text, f"{name} secret rendered by {path}"
            assert "S3cret" not in text
        error = await c.get("/status")
        assert "cannot reach PostgreSQL" in error.text or "migration" in error.text.lower()
        # A failing "back up now" (the URL's server is not there) reports its error on
        # the page, redacted.
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', error.text)
        assert csrf is not None
        started = await c.post("/status/backup", data={"csrf_token": csrf.group(1)})
        assert started.status_code == 303
        fragment = ""
        for _ in range(100):
            fragment = (await c.get("/status/backup")).text
            if server.app.state.dashboard.backup.error:
                fragment = (await c.get("/status/backup")).text
                break
            await asyncio.sleep(0.1)
        assert server.app.state.dashboard.backup.error, "the backup did not fail"
        assert "Error" in fragment
        for name, secret in [*secrets.items(), ("dashboard", TOKEN)]:
            assert secret not in fragment, f"{name} secret rendered by the backup fragment"
    for record in caplog.records:
        for name, secret in [*secrets.items(), ("dashboard", TOKEN)]:
            assert secret not in record.getMessage(), f"{name} secret logged"


async def test_every_answer_carries_the_security_headers(dashboard: Running) -> None:
    async with dashboard.client() as c:
        for path in ("/login", "/status", "/static/htmx.min.js"):
            response = await c.get(path)
            csp = response.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["cache-control"] == "no-store"


async def test_login_never_redirects_to_another_site(dashboard: Running) -> None:
    async with dashboard.client() as c:
        for target in ("https://evil.example/", "//evil.example", "/\\evil.example"):
            form = await c.get("/login", params={"next": target})
            nonce = re.search(r'name="login_nonce" value="([^"]+)"', form.text)
            assert nonce is not None
            done = await c.post(
                "/login", data={"login_nonce": nonce.group(1), "token": TOKEN, "next": target}
            )
            assert done.headers["location"] == "/status"


def test_the_dashboard_never_starts_without_a_good_token(
    tmp_path: Path, settings: Settings
) -> None:
    from kotonoha_bot.dashboard import dashboard_from_settings

    backend = Backend(object(), settings, "sqlite:///x.db")  # type: ignore[arg-type]
    for token in (None, "", "   ", "short-token"):
        with pytest.raises(ConfigError, match="DASHBOARD_TOKEN"):
            dashboard_from_settings(backend, settings, token=token)
    server = dashboard_from_settings(backend, settings, token="a-long-enough-token-123")
    assert server.host == "127.0.0.1" and server.requested_port == 8765
