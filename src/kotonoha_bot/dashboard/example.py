"""Example data for the dashboard's tests and screenshots, written through the real paths.

Documents are ingested like ``kotonoha kb ingest`` (from ``examples/corpus``),
conversations are sessions with Discord ids archived like the bot archives them (so
their chunks carry provenance), memories and usage go through the contract. Nothing is
written behind the contract's back, so the pages show what a real bot's data looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.knowledge.archive import archive_session
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from kotonoha_bot.knowledge.ingest import ingest_paths
from kotonoha_bot.models import ChatSession, Memory, Message, UsageRecord

#: Two guilds: a Japanese indie-game community and an English book club.
FOREST, OWLS = 1_180_000_000_000_000_001, 1_180_000_000_000_000_002
GUILD_NAMES = {FOREST: "ことはの森", OWLS: "Night Owls Book Club"}
GENERAL, DEV, BOOKS = (
    1_190_000_000_000_000_011,
    1_190_000_000_000_000_012,
    1_190_000_000_000_000_021,
)
MINA, YUU, SAM = 1_200_000_000_000_000_101, 1_200_000_000_000_000_102, 1_200_000_000_000_000_103
BOT = 1_200_000_000_000_000_999
#: Documents per guild (paths under examples/corpus).
DOCUMENTS = {
    FOREST: (
        "faq/faq-ja.md",
        "meetings/2026-05-15-kaigi.md",
        "project/known-issues.md",
        "rules/server-rules-ja.md",
        "events/offkai-tokyo-2026-07.md",
    ),
    OWLS: ("bookclub/salt-cartographer.md", "bookclub/host-guide.md", "rules/server-rules-en.md"),
}
CONVERSATIONS: dict[str, tuple[int, int, list[tuple[int, str]]]] = {
    f"mention:{GENERAL}:{MINA}": (
        FOREST,
        GENERAL,
        [
            (MINA, "次のオフ会っていつだっけ？"),
            (
                BOT,
                "7月18日（土）14時から、中目黒のカフェ・ルミエールです。"
                "#オフ会 の告知にリアクションしてね。",
            ),
            (MINA, "ありがとう！持ち物ある？"),
            (BOT, "名札とゲームの感想メモがあると楽しいですよ。"),
        ],
    ),
    f"eavesdrop:{DEV}": (
        FOREST,
        DEV,
        [
            (YUU, "ビルドが LT-1042 でまた落ちてる"),
            (MINA, "known-issues に回避策があったはず。キャッシュを消してから再ビルド"),
            (YUU, "消したら通った、助かる"),
            (BOT, "よかったです！LT-1042 は次のパッチで直る予定と記録されています。"),
        ],
    ),
    f"mention:{BOOKS}:{SAM}": (
        OWLS,
        BOOKS,
        [
            (SAM, "Who hosts the Salt Cartographer session?"),
            (BOT, "Rin hosts it on the first Friday; the host guide has the questions."),
            (SAM, "Great, and how long is the reading?"),
            (BOT, "About 120 pages, chapters one to six."),
        ],
    ),
}
MEMORIES = [
    (FOREST, MINA, "好きなジャンルはパズルゲーム"),
    (FOREST, MINA, "オフ会は午後なら参加できる"),
    (FOREST, YUU, "ビルド担当。Linux で開発している"),
    (OWLS, SAM, "Prefers short chapters and tea over coffee"),
]


@dataclass(frozen=True, slots=True)
class ExampleData:
    """What :func:`write_example_data` wrote."""

    guilds: tuple[int, ...]
    sessions: tuple[str, ...]
    chunks: int


def usage_rows(today: date, days: int = 30) -> list[UsageRecord]:
    """A month of believable token counts (deterministic: no randomness)."""
    rows = []
    for back in range(days):
        day = today - timedelta(days=back)
        wave = (back * 37) % 11
        rows.append(
            UsageRecord(
                day,
                "claude-sonnet-5-5",
                FOREST,
                MINA,
                3 + wave % 4,
                2_400 + 310 * wave,
                380 + 45 * wave,
            )
        )
        rows.append(
            UsageRecord(
                day,
                "claude-sonnet-5-5",
                FOREST,
                YUU,
                1 + wave % 3,
                1_100 + 150 * wave,
                210 + 30 * wave,
            )
        )
        if back % 2 == 0:
            rows.append(
                UsageRecord(
                    day, "claude-sonnet-5-5", OWLS, SAM, 2, 1_800 + 90 * wave, 300 + 20 * wave
                )
            )
        rows.append(UsageRecord(day, "claude-sonnet-5-5", FOREST, 0, 4, 600, 8))  # judgments
    return rows


async def write_example_data(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    corpus: Path,
    *,
    now: datetime | None = None,
) -> ExampleData:
    """Fill an empty database with two guilds' documents, conversations, memories, usage."""
    now = now or datetime.now(UTC)
    for guild, paths in DOCUMENTS.items():
        await ingest_paths(db, embedder, [corpus / p for p in paths], guild_id=guild)
    message_id = 1_300_000_000_000_000_000
    chunks = 0
    for n, (key, (guild, channel, lines)) in enumerate(CONVERSATIONS.items()):
        kind = key.split(":", 1)[0]
        start = now - timedelta(hours=6 - n, minutes=len(lines) * 3)
        session = ChatSession(
            key,
            kind,  # type: ignore[arg-type]
            guild_id=guild,
            channel_id=channel,
            user_id=lines[0][0] if kind == "mention" else None,
            created_at=start,
            last_active_at=start,
        )
        turn = None
        for i, (author, text) in enumerate(lines):
            message_id += 1
            at = start + timedelta(minutes=3 * i)
            if author == BOT:
                session.add_message(
                    Message("assistant", text, at, channel_id=channel, turn_id=turn)
                )
                continue
            turn = message_id
            name = {MINA: "ミナ", YUU: "ユウ", SAM: "Sam"}[author]
            session.add_message(
                Message(
                    "user",
                    text,
                    at,
                    author_id=author,
                    author_name=name,
                    discord_message_id=message_id,
                    channel_id=channel,
                    turn_id=turn,
                )
            )
        await db.save_session(session)
        stored = await db.load_session(key)
        assert stored is not None
        chunks += await archive_session(db, embedder, stored, window=4, overlap=1)
    for guild, user, text in MEMORIES:
        await db.add_memory(Memory(user, text, guild_id=guild), max_per_user=50)
    for row in usage_rows(now.date()):
        await db.record_usage(row)
    return ExampleData(tuple(DOCUMENTS), tuple(CONVERSATIONS), chunks)
