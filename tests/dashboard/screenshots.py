"""Screenshots of every dashboard page for docs/img/: ``python -m tests.dashboard.screenshots``.

The real app (``kotonoha dashboard``'s server) on a SQLite file filled with
:mod:`kotonoha_bot.dashboard.example` (documents from examples/corpus, archived
conversations, memories, a month of usage, a real backup), in the real Chromium at a
desktop viewport and a phone viewport, pages in Japanese and English. Japanese text
needs a CJK font: ``apt-get install fonts-noto-cjk``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from kotonoha_bot.config import Settings
from kotonoha_bot.dashboard.app import Backend
from kotonoha_bot.dashboard.example import FOREST, GUILD_NAMES, write_example_data
from kotonoha_bot.dashboard.server import DashboardServer
from kotonoha_bot.dashboard.status import BotLink
from kotonoha_bot.db import open_database
from kotonoha_bot.knowledge.embeddings import create_embedding_provider
from kotonoha_bot.transfer.backup import run_backup
from tests.dashboard.browser import launch_chromium

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "screenshot-token-0123456789"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


async def shoot(out: Path) -> list[Path]:
    work = Path(tempfile.mkdtemp(prefix="kotonoha-shots-"))
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_path=work / "kotonoha.db",
        backup_dir=work / "backups",
        embedding_provider="auto",
        guild_daily_token_budget=60_000,
        health_port=0,
    )
    url = settings.database_location()
    written: list[Path] = []
    async with open_database(url, settings=settings) as db:
        embedder = create_embedding_provider(settings)
        await write_example_data(db, embedder, ROOT / "examples" / "corpus")
        await run_backup(settings, url)
        source = next(
            s for s in await db.source_summaries(FOREST) if s.source.source_type == "document"
        )
        session = (await db.find_sessions(guild_id=FOREST))[0]
        backend = Backend(
            db, settings, url, embedder=lambda: embedder, bot=BotLink(guild_name=GUILD_NAMES.get)
        )
        server = DashboardServer(backend, token=TOKEN, host="127.0.0.1", port=0)
        await server.start()
        g = f"/guilds/{FOREST}"
        pages = [
            ("status", "/status", "ja", DESKTOP),
            ("guilds", "/guilds", "ja", DESKTOP),
            ("memory", g, "ja", DESKTOP),
            ("source", f"{g}/sources/{source.source.source_id}", "ja", DESKTOP),
            ("memories", f"{g}/memories", "ja", DESKTOP),
            ("search", f"{g}/search?q=次のオフ会はいつ？&top_k=5", "ja", DESKTOP),
            ("conversations", f"{g}/conversations", "ja", DESKTOP),
            ("transcript", f"{g}/conversations/{session.session_key}", "ja", DESKTOP),
            ("usage", "/usage?days=30", "en", DESKTOP),
            ("status-en", "/status", "en", DESKTOP),
            ("phone-status", "/status", "ja", PHONE),
            ("phone-search", f"{g}/search?q=オフ会&top_k=3", "ja", PHONE),
            ("phone-source", f"{g}/sources/{source.source.source_id}", "ja", PHONE),
            ("phone-usage", "/usage?days=30", "ja", PHONE),
        ]
        try:
            async with launch_chromium() as browser:
                for lang in ("ja", "en"):
                    context = await browser.new_context(
                        locale=lang, viewport=DESKTOP, device_scale_factor=1
                    )
                    page = await context.new_page()
                    if lang == "ja":
                        await page.goto(server.url + "/login")
                        path = out / "dashboard-login.png"
                        await page.screenshot(path=path)
                        written.append(path)
                    await page.goto(server.url + "/login")
                    await page.fill("#token", TOKEN)
                    await page.click("button[type=submit]")
                    for name, target, page_lang, viewport in pages:
                        if page_lang != lang:
                            continue
                        await page.set_viewport_size(viewport)
                        await page.goto(server.url + target)
                        path = out / f"dashboard-{name}.png"
                        await page.screenshot(path=path, full_page=viewport is DESKTOP)
                        written.append(path)
                    await context.close()
        finally:
            await server.stop()
            await embedder.aclose()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(shoot(args.out)):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    main()
