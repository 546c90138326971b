"""`kotonoha run`: the Discord bot."""

from __future__ import annotations

from kotonoha_bot.cli.common import fail, get_settings, run_async


@run_async
async def run() -> None:
    """Run the Discord bot until stopped (SIGTERM/Ctrl-C save every session first).

    All required settings are checked first and every missing one is named in one
    message (exit 2): DISCORD_TOKEN and the key of the chosen LLM_PROVIDER.
    Then: logging, database, embedding provider, LLM provider, the health server
    (HEALTH_PORT, 0 = off) and the Discord connection. See docs/BOT.md.

    Example: DISCORD_TOKEN=... ANTHROPIC_API_KEY=... kotonoha run
    """
    settings = get_settings()
    # Imported here so that other commands never load discord.py.
    from kotonoha_bot.bot.runtime import missing_run_settings, serve
    from kotonoha_bot.logging_setup import setup_logging

    missing = missing_run_settings(settings)
    if missing:
        raise fail(
            f"cannot start the bot: missing settings {', '.join(missing)}"
            f" (LLM_PROVIDER={settings.llm_provider}); set them in the environment or in"
            " .env (see .env.example)",
            2,
        )
    setup_logging(settings)
    await serve(settings)
