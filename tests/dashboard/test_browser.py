"""The dashboard as an operator uses it: real pages in a real headless Chromium.

Debian's ``chromium`` (Playwright drives it through ``executable_path``) against the
production app served by uvicorn on loopback, over the ``db`` fixture: every test runs
on a SQLite file and on PostgreSQL + pgvector, because the pages read through the
storage contract and the two backends implement it differently. What the browser shows
is checked against what the database then holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kotonoha_bot.dashboard.example import FOREST, OWLS
from kotonoha_bot.db import DatabaseProtocol
from tests.bot.sim import SimFactory
from tests.dashboard.conftest import TOKEN, Running, logged_in

PHONE = {"width": 390, "height": 844}


async def _hit_ids(page: Any, mode: str) -> list[int]:
    """Chunk ids listed in one mode's table of the playground."""
    table = page.locator(f"#hits-{mode}")
    if await table.count() == 0:
        return []
    text = await table.inner_text()
    return [int(x) for x in re.findall(r"\(id (\d+)\)", text)]


async def test_an_operator_logs_in_with_the_token_and_out_again(
    browser: Any, dashboard: Running
) -> None:
    ctx = await browser.new_context(locale="en")
    page = await ctx.new_page()
    await page.goto(dashboard.url + f"/guilds/{FOREST}")
    assert page.url.startswith(dashboard.url + "/login")  # sent to the login form
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(dashboard.url + f"/guilds/{FOREST}")  # and back where it was
    assert "ことはの森" in await page.content() or str(FOREST) in await page.content()
    cookies = {c["name"]: c for c in await ctx.cookies()}
    session = cookies["kotonoha_dashboard"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    # The cookie is out of reach of the page's scripts.
    assert "kotonoha_dashboard" not in await page.evaluate("document.cookie")
    await page.click("form[action='/logout'] button")
    await page.wait_for_url(dashboard.url + "/login")
    await page.goto(dashboard.url + "/status")
    assert page.url.startswith(dashboard.url + "/login")
    await ctx.close()


async def test_a_browser_without_the_right_token_sees_only_the_login_form(
    browser: Any, dashboard: Running
) -> None:
    ctx = await browser.new_context(locale="en")
    page = await ctx.new_page()
    for path in ("/status", f"/guilds/{FOREST}/memories", "/usage"):
        await page.goto(dashboard.url + path)
        assert page.url.startswith(dashboard.url + "/login?next=")
        html = await page.content()
        assert "オフ会" not in html and "ミナ" not in html
    await page.fill("#token", "not-the-token-at-all")
    await page.click("button[type=submit]")
    assert await page.locator(".alert, [role=alert]").first.inner_text() != ""
    assert "That token is not right." in await page.content()
    assert "kotonoha_dashboard" not in {c["name"] for c in await ctx.cookies()}
    api = await page.goto(dashboard.url + "/api/status")
    assert api is not None and api.status == 401
    await ctx.close()


async def test_a_form_with_a_forged_csrf_token_is_rejected_and_changes_nothing(
    page: Any, dashboard: Running
) -> None:
    await page.goto(dashboard.url + "/status")
    await page.evaluate(
        "document.querySelectorAll('input[name=csrf_token]')"
        ".forEach(i => { i.value = 'forged-' + i.value.slice(7); })"
    )
    async with page.expect_response(lambda r: r.url.endswith("/status/pause")) as caught:
        await page.click("#pause")
    response = await caught.value
    assert response.status == 403
    assert not (await dashboard.db.pause_state()).paused
    # The untouched form goes through.
    await page.goto(dashboard.url + "/status")
    await page.click("#pause")
    await page.wait_for_selector("#resume")
    assert (await dashboard.db.pause_state()).paused


async def test_an_operator_browses_a_guilds_memory_down_to_chunks_with_provenance(
    page: Any, dashboard: Running
) -> None:
    await page.goto(dashboard.url + "/guilds")
    await page.click(f"a[href='/guilds/{FOREST}']")
    await page.wait_for_url(dashboard.url + f"/guilds/{FOREST}")
    documents = await dashboard.db.source_summaries(FOREST)
    html = await page.content()
    for summary in documents:
        assert summary.source.title in html
    # The owls' documents are not in the forest's memory.
    for summary in await dashboard.db.source_summaries(OWLS):
        assert f"/sources/{summary.source.source_id}'" not in html
        assert f'/sources/{summary.source.source_id}"' not in html
    conversation = next(s for s in documents if s.source.source_type == "conversation")
    await page.click(f"a[href='/guilds/{FOREST}/sources/{conversation.source.source_id}']")
    rows = page.locator("table.chunks tbody tr")
    assert await rows.count() > 0
    links = page.locator("table.chunks a[href^='https://discord.com/channels/']")
    assert await links.count() > 0  # an archived conversation links back to Discord
    assert f"/channels/{FOREST}/" in (await links.first.get_attribute("href") or "")
    await page.goto(dashboard.url + f"/guilds/{FOREST}")
    await page.click(f".tabs a[href='/guilds/{FOREST}/memories']")
    memories = await dashboard.db.list_memories(guild_id=FOREST)
    text = await page.inner_text("main")
    for memory in memories:
        assert memory.content in text


async def test_a_deleted_chunk_is_gone_from_the_page_and_from_every_search_mode(
    page: Any, dashboard: Running
) -> None:
    query = "次のオフ会はいつ？"
    search = dashboard.url + f"/guilds/{FOREST}/search"
    await page.goto(search)
    await page.fill("#q", query)
    await page.fill("#top_k", "5")
    await page.click("#run-search")
    await page.wait_for_selector("#hits-hybrid")
    top = (await _hit_ids(page, "hybrid"))[0]
    await page.click("#hits-hybrid tbody tr:first-child a")
    row = page.locator(f"#chunk-{top}")
    assert await row.count() == 1
    await row.locator("button.delete-chunk").click()  # htmx, after the confirm dialog
    await row.wait_for(state="detached")
    assert await page.locator(f"#chunk-{top}").count() == 0
    await page.reload()
    assert await page.locator(f"#chunk-{top}").count() == 0
    await page.goto(search + "?" + f"q={query}&top_k=5")
    for mode in ("hybrid", "vector", "keyword"):
        assert top not in await _hit_ids(page, mode), mode
    assert all(
        top != h.chunk_id
        for h in await dashboard.db.list_chunk_page(
            (await dashboard.db.source_summaries(FOREST))[0].source.source_id or 0,
            guild_id=FOREST,
        )
    )


async def test_the_playground_shows_three_modes_with_ranks_and_what_the_floor_drops(
    page: Any, dashboard: Running
) -> None:
    await page.goto(dashboard.url + f"/guilds/{FOREST}/search")
    await page.fill("#q", "LT-1042 ビルド")
    await page.click("#run-search")
    await page.wait_for_selector("#floor-verdict")
    for mode in ("hybrid", "vector", "keyword"):
        assert await _hit_ids(page, mode), mode
    hybrid = page.locator("#hits-hybrid tbody tr")
    cells = await hybrid.first.locator("td").all_inner_texts()
    # vector rank, keyword rank, similarity, coverage, fused score
    assert re.fullmatch(r"\d+|—", cells[2].strip()) and re.fullmatch(r"\d+|—", cells[3].strip())
    assert re.fullmatch(r"\d\.\d{3}", cells[6].strip())
    assert "LT-1042" in await page.inner_text("#hits-keyword")
    # A bug id found whole in one file is put first by the exact-match lead, and the
    # page marks the row (its score alone would not say why it is first).
    await page.fill("#q", "LT-1163")
    await page.click("#run-search")
    await page.wait_for_selector("#hits-hybrid .lead")
    first = await hybrid.first.locator("td").all_inner_texts()
    assert "↑" in first[0] and "Known issues" in first[1]  # the file listing LT-1163
    # Floors no hit can reach drop everything, and the page says so.
    await page.fill("#q", "zqxj wvyk ぴよぴよ")
    await page.fill("#min_similarity", "0.999")
    await page.fill("#min_coverage", "0.999")
    await page.click("#run-search")
    await page.wait_for_selector("#floor-verdict.alert")
    assert "SEARCH_MIN_SIMILARITY=0.999" in await page.content()


async def test_the_usage_page_draws_tokens_per_guild_and_day(page: Any, dashboard: Running) -> None:
    await page.goto(dashboard.url + "/usage?days=30")
    chart = page.locator(".chart-wrap svg")
    await chart.wait_for()
    box = await chart.bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 100
    bars = await chart.locator("rect, path, polyline").count()
    assert bars > 5
    table = await page.inner_text("#usage-table")
    assert str(FOREST) in await page.content() or "ことはの森" in table


async def test_another_guilds_objects_are_refused_through_the_address_bar(
    page: Any, dashboard: Running
) -> None:
    forest_source = (await dashboard.db.source_summaries(FOREST))[0].source.source_id
    forest_session = (await dashboard.db.find_sessions(guild_id=FOREST))[0].session_key
    for path in (
        f"/guilds/{OWLS}/sources/{forest_source}",
        f"/guilds/{OWLS}/conversations/{forest_session}",
    ):
        response = await page.goto(dashboard.url + path)
        assert response is not None and response.status == 404, path
        html = await page.content()
        assert "オフ会" not in html and "ミナ" not in html
    # The owls' playground never finds the forest's documents.
    query = "search?q=オフ会 中目黒&top_k=10"
    await page.goto(dashboard.url + f"/guilds/{FOREST}/{query}")
    assert "中目黒" in await page.inner_text("main .modes")  # the forest's own answer
    await page.goto(dashboard.url + f"/guilds/{OWLS}/{query}")
    await page.wait_for_selector("#floor-verdict")
    assert "中目黒" not in await page.inner_text("main .modes")
    # Deleting another guild's chunk through this guild's URL, with a valid CSRF token.
    chunk = (await dashboard.db.list_chunk_page(forest_source or 0, guild_id=FOREST))[0]
    csrf = await page.get_attribute("input[name=csrf_token]", "value")
    refused = await page.request.post(
        dashboard.url + f"/guilds/{OWLS}/chunks/{chunk.chunk_id}/delete",
        form={"csrf_token": csrf or ""},
        headers={"Origin": dashboard.url},
    )
    assert refused.status == 404
    still = await dashboard.db.list_chunk_page(forest_source or 0, guild_id=FOREST)
    assert chunk.chunk_id in [c.chunk_id for c in still]


async def test_the_pause_switch_stops_the_bots_answers_until_resumed(
    browser: Any, dashboard: Running, make_sim: SimFactory, db: DatabaseProtocol
) -> None:
    page = await logged_in(browser, dashboard.url)
    try:
        async with make_sim() as sim:
            guild = sim.guild()
            general = guild.create_text_channel("general")
            mina = sim.member(guild, "ミナ")
            await page.goto(dashboard.url + "/status")
            await page.click("#pause")
            await page.wait_for_selector("#resume")
            calls = len(sim.api.requests) if hasattr(sim.api, "requests") else None
            await sim.mention(mina, general, "いる？")
            assert [m for m in general.history() if m.author.bot] == []
            if calls is not None:
                assert len(sim.api.requests) == calls  # no LLM call while paused
            assert await db.load_session(f"mention:{general.id}:{mina.id}") is None
            await page.click("#resume")
            await page.wait_for_selector("#pause")
            await sim.mention(mina, general, "いる？")
            replies = [m.content for m in general.history() if m.author.bot]
            assert replies == ["echo: いる？"]
    finally:
        await page.context.close()


async def test_the_ui_speaks_japanese_or_english_as_the_browser_asks(
    browser: Any, dashboard: Running
) -> None:
    expected = {"ja": ("状態", "記憶", "使用量"), "en": ("Status", "Memory", "Usage")}
    for locale, words in expected.items():
        page = await logged_in(browser, dashboard.url, locale=locale)
        try:
            assert await page.get_attribute("html", "lang") == locale
            nav = await page.inner_text("header nav")
            for word in words:
                assert word in nav, (locale, word)
            other = expected["en" if locale == "ja" else "ja"]
            assert other[0] not in nav
        finally:
            await page.context.close()


async def test_every_page_fits_a_phone_screen_without_sideways_scrolling(
    browser: Any, dashboard: Running
) -> None:
    source = (await dashboard.db.source_summaries(FOREST))[0].source.source_id
    session = (await dashboard.db.find_sessions(guild_id=FOREST))[0].session_key
    page = await logged_in(
        browser, dashboard.url, locale="ja", viewport=PHONE, is_mobile=True, has_touch=True
    )
    try:
        g = f"/guilds/{FOREST}"
        for path in (
            "/status",
            "/guilds",
            g,
            f"{g}/sources/{source}",
            f"{g}/memories",
            f"{g}/search?q=オフ会&top_k=3",
            f"{g}/conversations",
            f"{g}/conversations/{session}",
            "/usage",
        ):
            await page.goto(dashboard.url + path)
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (path, width)
            # The navigation stays reachable: every link of it is on screen.
            for link in await page.locator("header nav a").all():
                box = await link.bounding_box()
                assert box is not None and box["x"] >= 0
                assert box["x"] + box["width"] <= PHONE["width"], path
    finally:
        await page.context.close()


async def test_an_uploaded_document_is_ingested_into_that_guild_only(
    page: Any, dashboard: Running, tmp_path: Path
) -> None:
    doc = tmp_path / "lantern-festival.md"
    doc.write_text(
        "# 灯籠まつり\n\n森の灯籠まつりは9月27日の夜、集会所の裏庭で開きます。"
        "持ち物は小さな懐中電灯です。\n",
        encoding="utf-8",
    )
    await page.goto(dashboard.url + f"/guilds/{FOREST}")
    await page.set_input_files("#upload-file", str(doc))
    await page.click("#upload-button")
    await page.wait_for_selector("#upload-result")
    assert "lantern-festival.md" in await page.inner_text("#upload-result")
    titles = [s.source.title for s in await dashboard.db.source_summaries(FOREST)]
    assert "灯籠まつり" in titles or any("lantern" in t for t in titles)
    await page.goto(dashboard.url + f"/guilds/{FOREST}/search?q=灯籠まつり 懐中電灯&top_k=3")
    assert "懐中電灯" in await page.inner_text("#hits-keyword")
    await page.goto(dashboard.url + f"/guilds/{OWLS}/search?q=灯籠まつり 懐中電灯&top_k=3")
    await page.wait_for_selector("#floor-verdict")
    assert "懐中電灯" not in await page.inner_text("main")


async def test_an_explicit_memory_and_a_conversation_are_deleted_from_the_browser(
    page: Any, dashboard: Running
) -> None:
    (memory, *_rest) = await dashboard.db.list_memories(guild_id=FOREST)
    await page.goto(dashboard.url + f"/guilds/{FOREST}/memories")
    row = page.locator(f"#memory-{memory.memory_id}")
    await row.locator("button").click()  # htmx, after the confirm dialog
    await row.wait_for(state="detached")
    left = [m.memory_id for m in await dashboard.db.list_memories(guild_id=FOREST)]
    assert memory.memory_id not in left and len(left) == len(_rest)
    session = (await dashboard.db.find_sessions(guild_id=FOREST))[0]
    await page.goto(dashboard.url + f"/guilds/{FOREST}/conversations")
    await page.click(f"a[href$='/conversations/{quote(session.session_key, safe='')}']")
    await page.click("#delete-conversation")  # a plain form, after the confirm dialog
    await page.wait_for_url(re.compile(r".*/conversations(\?.*)?$"))
    assert await dashboard.db.load_session(session.session_key) is None
    # Its archived chunks went with it.
    sources = await dashboard.db.source_summaries(FOREST)
    assert session.session_key not in [s.source.session_key for s in sources]
    assert session.session_key not in await page.inner_text("main")
