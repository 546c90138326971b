"""The dashboard's pages: status, memory, search playground, conversations, usage.

Each view gets the :class:`~kotonoha_bot.dashboard.app.Dashboard` and an authorised
:class:`~kotonoha_bot.dashboard.app.Page` (the guard has checked the token, the CSRF
token of a state change and the guild of the URL). Views read and write only through
the storage contract, always naming ``page.guild_id``: a source, chunk, memory or
session of another guild is "not found". State changes answer with a redirect to a
page (so reloading never repeats them), or with a fragment when htmx asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from datetime import date, timedelta
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.datastructures import UploadFile
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from kotonoha_bot.dashboard.chart import group_series, legend, stacked_bars
from kotonoha_bot.dashboard.playground import Tuning, compare_modes, effective_profile
from kotonoha_bot.dashboard.status import gather_status
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.knowledge.ingest import IngestReport, ingest_bytes
from kotonoha_bot.models import MessageLink, utcnow
from kotonoha_bot.redact import redact

if TYPE_CHECKING:
    from kotonoha_bot.dashboard.app import Dashboard, Page

log = logging.getLogger("kotonoha_bot.dashboard")

CHUNKS_PER_PAGE = 25
SESSIONS_PER_PAGE = 50
MEMORIES_PER_PAGE = 100
USAGE_DAYS = (7, 14, 30, 90)
MAX_QUERY_CHARS = 1000
MAX_NAME_CHARS = 120
#: Flash messages a redirect may ask for (only these keys: never text from the URL).
FLASHES = ("deleted", "paused", "running", "backup_started", "reindexed")


def _redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303)


def _flash(page: Page) -> str:
    key = page.request.query_params.get("done", "")
    return key if key in FLASHES else ""


def _number(page: Page, name: str, *, low: int = 0, high: int = 2**63 - 1) -> int | None:
    value = page.request.query_params.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or len(value) > 19 or not low <= int(value) <= high:
        raise _BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(value)


def _fraction(page: Page, name: str, low: float, high: float) -> float | None:
    value = page.request.query_params.get(name, "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise _BadRequest(f"{name} must be a number from {low} to {high}") from None
    if not low <= number <= high:
        raise _BadRequest(f"{name} must be a number from {low} to {high}")
    return number


class _BadRequest(KotonohaError):
    """A query parameter the page cannot use."""


def _path_id(page: Page, name: str) -> int | None:
    text = str(page.request.path_params.get(name, ""))
    if not text.isdigit() or len(text) > 19 or int(text) >= 2**63:
        return None
    return int(text)


def _guild(page: Page) -> int:
    assert page.guild_id is not None  # the guard resolved it
    return page.guild_id


def _guild_name(dash: Dashboard, guild_id: int) -> str:
    link = dash.backend.bot
    name = link.guild_name(guild_id) if link is not None and link.guild_name else None
    return name or f"#{guild_id}"


# --- status -----------------------------------------------------------------------------


async def home(dash: Dashboard, page: Page) -> Response:
    return _redirect("/status")


async def status_page(dash: Dashboard, page: Page) -> Response:
    b = dash.backend
    report = await gather_status(b.db, b.url, b.settings, b.embedder(), b.bot)
    return dash.render(
        page, "status.html", report=report, job=dash.backup, flash=_flash(page), nav="status"
    )


async def status_json(dash: Dashboard, page: Page) -> Response:
    b = dash.backend
    r = await gather_status(b.db, b.url, b.settings, b.embedder(), b.bot)
    s = r.stats
    return JSONResponse(
        {
            "paused": r.pause.paused,
            "paused_since": r.pause.since.isoformat() if r.pause.since else None,
            "backend": s.backend,
            "location": s.location,
            "schema_version": s.schema_version,
            "schema_expected": r.expected_schema,
            "counts": {
                "sessions": s.sessions,
                "messages": s.messages,
                "sources": s.sources,
                "chunks": s.chunks,
                "pending_chunks": s.pending_chunks,
            },
            "index": {"kind": r.index.kind, "state": r.index.state, "detail": r.index.detail},
            "embedding": (
                {"model": r.recorded_embedding.model, "dimension": r.recorded_embedding.dimension}
                if r.recorded_embedding
                else None
            ),
            "migration_in_progress": r.migration_marker is not None,
            "last_backup": r.last_backup.at.isoformat() if r.last_backup else None,
            "discord_connected": r.health.discord,
            "llm": r.health.llm,
            "versions": r.versions,
        }
    )


async def pause(dash: Dashboard, page: Page) -> Response:
    await dash.db.set_paused(True, by="dashboard")
    log.warning("the bot was paused from the dashboard")
    return _redirect("/status?done=paused")


async def resume(dash: Dashboard, page: Page) -> Response:
    await dash.db.set_paused(False)
    log.warning("the bot was resumed from the dashboard")
    return _redirect("/status?done=running")


async def backup_now(dash: Dashboard, page: Page) -> Response:
    from kotonoha_bot.transfer.backup import run_backup

    job = dash.backup
    if job.task is None or job.task.done():
        b = dash.backend
        job.started, job.result, job.error = utcnow(), "", ""
        job.task = asyncio.create_task(run_backup(b.settings, b.url), name="dashboard backup")
        job.task.add_done_callback(lambda task: _backup_done(dash, task))
    return _redirect("/status?done=backup_started")


def _backup_done(dash: Dashboard, task: asyncio.Task[Any]) -> None:
    job = dash.backup
    if task.cancelled():
        job.error = "cancelled"
    elif (exc := task.exception()) is not None:
        job.error = redact(f"{type(exc).__name__}: {exc}")
        log.warning("dashboard backup failed: %s", job.error)
    else:
        job.result = str(task.result())
        log.info("dashboard backup written: %s", job.result)


async def backup_state(dash: Dashboard, page: Page) -> Response:
    return dash.render(page, "backup_fragment.html", job=dash.backup)


async def reindex(dash: Dashboard, page: Page) -> Response:
    await dash.db.rebuild_vector_index()
    return _redirect("/status?done=reindexed")


# --- memory -----------------------------------------------------------------------------


async def guilds(dash: Dashboard, page: Page) -> Response:
    found = [g for g in await dash.db.list_guilds() if dash.allows(g.guild_id)]
    names = {g.guild_id: _guild_name(dash, g.guild_id) for g in found}
    return dash.render(page, "guilds.html", guilds=found, names=names, nav="memory")


async def guild_memory(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    summaries = await dash.db.source_summaries(guild)
    q = page.request.query_params
    uploaded = None
    if q.get("uploaded"):
        uploaded = {
            "name": q.get("uploaded", "")[:MAX_NAME_CHARS],
            "outcome": q.get("outcome", "")[:20],
            "chunks": q.get("chunks", "0")[:10],
        }
    return dash.render(
        page,
        "guild.html",
        name=_guild_name(dash, guild),
        documents=[s for s in summaries if s.source.source_type == "document"],
        conversations=[s for s in summaries if s.source.source_type == "conversation"],
        flash=_flash(page),
        uploaded=uploaded,
        upload_error=q.get("upload_error", "")
        if q.get("upload_error")
        in (
            "upload_too_big",
            "upload_empty",
        )
        else "",
        nav="memory",
    )


async def upload(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    s = dash.backend.settings
    assert page.form is not None
    file = page.form.get("file")
    back = f"/guilds/{guild}"
    if not isinstance(file, UploadFile) or not file.filename:
        return _redirect(f"{back}?upload_error=upload_empty")
    data = await file.read(s.kb_add_max_bytes + 1)
    if len(data) > s.kb_add_max_bytes:
        return _redirect(f"{back}?upload_error=upload_too_big")
    if not data:
        return _redirect(f"{back}?upload_error=upload_empty")
    name = PurePosixPath(file.filename.replace("\\", "/")).name[:MAX_NAME_CHARS] or "upload"
    report = IngestReport()
    outcome = await ingest_bytes(
        dash.db,
        dash.backend.embedder(),
        uri=f"dashboard:{name}",
        data=data,
        guild_id=guild,
        metadata={"kind": "document", "path": f"dashboard:{name}", "added_by": "dashboard"},
        max_chars=s.chunk_max_chars,
        overlap_chars=s.chunk_overlap_chars,
        batch_size=s.embedding_batch_size,
        report=report,
    )
    log.info("dashboard: %s into guild %d: %s", name, guild, outcome)
    query = urlencode({"uploaded": name, "outcome": outcome, "chunks": report.chunks})
    return _redirect(f"{back}?{query}")


async def source(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    source_id = _path_id(page, "source_id")
    found = await dash.db.get_source(source_id) if source_id is not None else None
    if found is None or found.guild_id != guild or source_id is None:
        return dash.error(page, 404, page.t("not_found"))
    number = _number(page, "page", low=1, high=10**9) or 1
    rows = await dash.db.list_chunk_page(
        source_id,
        guild_id=guild,
        offset=(number - 1) * CHUNKS_PER_PAGE,
        limit=CHUNKS_PER_PAGE + 1,
    )
    chunks = rows[:CHUNKS_PER_PAGE]
    origins = await dash.db.chunk_origins([c.chunk_id for c in chunks]) if chunks else {}
    return dash.render(
        page,
        "source.html",
        source=found,
        chunks=chunks,
        origins=origins,
        number=number,
        more=len(rows) > CHUNKS_PER_PAGE,
        nav="memory",
    )


async def delete_source(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    source_id = _path_id(page, "source_id")
    found = await dash.db.get_source(source_id) if source_id is not None else None
    if found is None or found.guild_id != guild or source_id is None:
        return dash.error(page, 404, page.t("not_found"))
    await dash.db.delete_source(source_id)
    log.info("dashboard: deleted source %d (%s) of guild %d", source_id, found.uri, guild)
    return _redirect(f"/guilds/{guild}?done=deleted")


async def delete_chunk(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    chunk_id = _path_id(page, "chunk_id")
    if chunk_id is None or not await dash.db.delete_chunk(chunk_id, guild_id=guild):
        return dash.error(page, 404, page.t("not_found"))
    log.info("dashboard: deleted chunk %d of guild %d", chunk_id, guild)
    if "hx-request" in page.request.headers:
        return HTMLResponse("")  # htmx swaps the chunk's row out
    assert page.form is not None
    back = page.form.get("return_to")
    target = back if isinstance(back, str) and back.startswith(f"/guilds/{guild}/") else ""
    return _redirect(target or f"/guilds/{guild}?done=deleted")


async def memories(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    user = _number(page, "user")
    before = _number(page, "before", low=1)
    found = await dash.db.list_memories(
        guild_id=guild, user_id=user, limit=MEMORIES_PER_PAGE + 1, before_id=before
    )
    return dash.render(
        page,
        "memories.html",
        name=_guild_name(dash, guild),
        memories=found[:MEMORIES_PER_PAGE],
        more=found[MEMORIES_PER_PAGE - 1].memory_id if len(found) > MEMORIES_PER_PAGE else None,
        user=user,
        flash=_flash(page),
        nav="memory",
    )


async def delete_memory(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    memory_id = _path_id(page, "memory_id")
    if memory_id is None or not await dash.db.delete_memory(
        memory_id, guild_id=guild, user_id=None
    ):
        return dash.error(page, 404, page.t("not_found"))
    log.info("dashboard: deleted memory %d of guild %d", memory_id, guild)
    if "hx-request" in page.request.headers:
        return HTMLResponse("")
    return _redirect(f"/guilds/{guild}/memories?done=deleted")


# --- search playground --------------------------------------------------------------------


async def search(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    q = page.request.query_params
    query = q.get("q", "")[:MAX_QUERY_CHARS]
    channel = _number(page, "channel")
    top_k = _number(page, "top_k", low=1, high=50) or dash.backend.settings.search_top_k
    tuning = Tuning(
        vector_share=_fraction(page, "vector_share", 0.0, 1.0),
        min_similarity=_fraction(page, "min_similarity", -1.0, 1.0),
        min_coverage=_fraction(page, "min_coverage", 0.0, 1.0),
    )
    embedder = dash.backend.embedder()
    comparison = None
    if query.strip():
        comparison = await compare_modes(
            dash.db,
            embedder,
            query,
            guild_id=guild,
            channel_id=channel,
            top_k=top_k,
            tuning=tuning,
        )
    return dash.render(
        page,
        "search.html",
        name=_guild_name(dash, guild),
        query=query,
        channel=channel,
        top_k=top_k,
        tuning=tuning,
        measured=effective_profile(embedder, Tuning()),
        comparison=comparison,
        model=embedder.model if embedder is not None else None,
        nav="search",
    )


# --- conversations ------------------------------------------------------------------------


async def conversations(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    channel = _number(page, "channel")
    user = _number(page, "user")
    number = _number(page, "page", low=1, high=10**9) or 1
    rows = await dash.db.find_sessions(
        guild_id=guild,
        channel_id=channel,
        user_id=user,
        offset=(number - 1) * SESSIONS_PER_PAGE,
        limit=SESSIONS_PER_PAGE + 1,
    )
    return dash.render(
        page,
        "conversations.html",
        name=_guild_name(dash, guild),
        sessions=rows[:SESSIONS_PER_PAGE],
        more=len(rows) > SESSIONS_PER_PAGE,
        number=number,
        channel=channel,
        user=user,
        flash=_flash(page),
        nav="conversations",
    )


async def transcript(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    key = str(page.request.path_params["session_key"])
    session = await dash.db.load_session(key)
    if session is None or session.guild_id != guild:
        return dash.error(page, 404, page.t("not_found"))
    links = [
        MessageLink(guild, m.channel_id, m.discord_message_id)
        if m.channel_id is not None and m.discord_message_id is not None
        else None
        for m in session.messages
    ]
    return dash.render(
        page,
        "transcript.html",
        session=session,
        rows=list(zip(session.messages, links, strict=True)),
        nav="conversations",
    )


async def delete_conversation(dash: Dashboard, page: Page) -> Response:
    guild = _guild(page)
    key = str(page.request.path_params["session_key"])
    result = await dash.db.delete_conversation(key, guild_id=guild)
    if result.sessions == 0:
        return dash.error(page, 404, page.t("not_found"))
    chat = dash.backend.chat
    if chat is not None:  # inside the bot: its cached copy of the session goes too
        await chat.changes.catch_up(result.session_keys, result.rearchive)
    log.info(
        "dashboard: deleted session %s of guild %d (%d messages, %d chunks)",
        key,
        guild,
        result.messages,
        result.chunks,
    )
    return _redirect(f"/guilds/{guild}/conversations?done=deleted")


# --- usage ----------------------------------------------------------------------------------


async def usage(dash: Dashboard, page: Page) -> Response:
    s = dash.backend.settings
    days = _number(page, "days", low=1, high=366) or 30
    days = min(USAGE_DAYS, key=lambda d: abs(d - days))
    today = utcnow().date()
    first = today - timedelta(days=days - 1)
    rows = await dash.db.list_usage(since=first, until=today)
    per_guild: dict[int, dict[date, int]] = defaultdict(lambda: defaultdict(int))
    today_tokens: dict[int, int] = defaultdict(int)
    month_tokens: dict[int, int] = defaultdict(int)
    calls: dict[int, int] = defaultdict(int)
    for row in rows:
        if row.guild_id and not dash.allows(row.guild_id):
            continue
        if not row.guild_id and dash.allowed is not None:
            continue  # DMs are no guild: only a dashboard for every guild shows them
        per_guild[row.guild_id][row.day] += row.total_tokens
        calls[row.guild_id] += row.calls
        if row.day == today:
            today_tokens[row.guild_id] += row.total_tokens
        if row.day.month == today.month and row.day.year == today.year:
            month_tokens[row.guild_id] += row.total_tokens
    label = {g: (page.t("dms") if g == 0 else _guild_name(dash, g)) for g in per_guild}
    series = group_series(
        {label[g]: dict(v) for g, v in per_guild.items()}, other_label=page.t("other")
    )
    svg = stacked_bars(series, first, today, title=page.t("tokens_per_day"))
    budget = s.guild_daily_token_budget
    table = [
        {
            "guild_id": g,
            "label": label[g],
            "today": today_tokens.get(g, 0),
            "month": month_tokens.get(g, 0),
            "calls": calls.get(g, 0),
            "left": max(budget - today_tokens.get(g, 0), 0) if budget and g else None,
            "reached": bool(budget and g and today_tokens.get(g, 0) >= budget),
        }
        for g in sorted(per_guild, key=lambda g: (-sum(per_guild[g].values()), g))
    ]
    return dash.render(
        page,
        "usage.html",
        svg=svg,
        legend=legend(series),
        table=table,
        days=days,
        choices=USAGE_DAYS,
        budget=budget,
        user_budget=s.user_daily_token_budget,
        nav="usage",
    )
