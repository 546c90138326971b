"""Memory that belongs to the people who said it, on a simulated Discord (SimCord).

Each test runs the production bot against SimCord on both storage backends (a real
SQLite file, a real PostgreSQL), with the real Anthropic SDK talking to the fake API
server. What is checked is what a member would notice — the bot's messages, the
slash-command answers — and what is stored and sent to the model: after a delete,
the text is in no session, no chunk and no later prompt.
"""

from __future__ import annotations

from pathlib import Path

import discord
import pytest

from kotonoha_bot.bot import texts
from tests.bot.sim import SimFactory
from tests.fakes.api_server import FakeAPIServer, Reply
from tests.fakes.pdf import make_pdf

PHONE = "090-1234-5678"


async def test_a_deleted_message_leaves_sessions_knowledge_and_the_next_prompt(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        guild, general, mina = sim.room()
        secret = await sim.mention(mina, general, f"わたしの電話番号は{PHONE}です")
        await sim.mention(mina, general, "猫の名前はタマです")
        assert sim.bot_messages(general) == [
            f"echo: わたしの電話番号は{PHONE}です",
            "echo: 猫の名前はタマです",
        ]
        await sim.archive()
        assert PHONE in await sim.stored_text()  # in the session and in a chunk

        await mina.delete(secret)  # Discord sends MESSAGE_DELETE; the bot follows

        text = await sim.stored_text()
        assert PHONE not in text  # nor the bot's reply that repeated it
        assert "タマ" in text  # the rest stays, archived again without it
        hits = await sim.chat.search(guild.id, general.id, "猫の名前 タマ")
        assert any("タマ" in h.hit.content for h in hits)  # archived again without the phone
        assert not any(PHONE in h.hit.content for h in hits)
        await sim.mention(mina, general, "電話番号おぼえてる？")
        assert PHONE not in sim.prompt()
        assert "タマ" in sim.prompt()  # the history still has the rest


async def test_a_bulk_delete_removes_every_message_and_the_bots_replies(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        await sim.mention(mina, general, "合言葉はORCHID")
        await sim.mention(yuu, general, "合言葉はLOTUS")
        await sim.mention(mina, general, "天気がいいね")
        await sim.archive()
        history = general.history()
        purge = [m for m in history if "ORCHID" in m.content or "LOTUS" in m.content]
        assert len(purge) == 4  # two members' messages and the bot's two echoes

        # A moderator's purge: one MESSAGE_DELETE_BULK (messages not in the cache too).
        channel = sim.bot.get_channel(general.id)
        assert isinstance(channel, discord.TextChannel)
        await sim.as_moderator(lambda bot: channel.delete_messages(purge))

        text = await sim.stored_text()
        assert "ORCHID" not in text and "LOTUS" not in text
        assert "天気" in text
        await sim.mention(yuu, general, "合言葉は？")
        assert "ORCHID" not in sim.prompt() and "LOTUS" not in sim.prompt()
        hits = await sim.chat.search(guild.id, general.id, "合言葉 ORCHID LOTUS")
        assert not any("ORCHID" in h.hit.content or "LOTUS" in h.hit.content for h in hits)


async def test_an_edit_replaces_the_text_everywhere(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        guild, general, mina = sim.room()
        said = await sim.mention(mina, general, "集合は駅の北口で10時")
        await sim.mention(mina, general, "持ち物はお弁当")
        await sim.archive()

        assert sim.bot.user is not None
        await mina.edit(said, f"{sim.bot.user.mention} 集合は公園の噴水で11時")

        text = await sim.stored_text()
        assert "北口" not in text  # the old words, and the reply that repeated them, are gone
        assert "噴水で11時" in text and "お弁当" in text
        session = await sim.db.load_session(f"mention:{general.id}:{mina.id}")
        assert session is not None and session.messages[0].content == "集合は公園の噴水で11時"
        hits = await sim.chat.search(guild.id, general.id, "集合 噴水")
        assert any("噴水で11時" in h.hit.content for h in hits)  # archived again, new text
        await sim.mention(mina, general, "集合場所はどこだっけ")
        assert "北口" not in sim.prompt() and "噴水で11時" in sim.prompt()


async def test_a_moderator_deleting_the_bots_reply_removes_it_from_memory(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, mod = sim.member(guild, "ミナ"), sim.member(guild, "モデレーター", admin=True)
        sim.api.script("messages", [Reply(text="ミナさんの住所は東京都港区ですね")])
        await sim.mention(mina, general, "住所を覚えて")
        reply = next(m for m in general.history() if m.author.bot)
        await mod.delete(reply)
        assert "港区" not in await sim.stored_text()
        await sim.mention(mina, general, "住所は？")
        assert "港区" not in sim.prompt()


async def test_forget_me_removes_my_words_and_the_bots_echoes(make_sim: SimFactory) -> None:
    async with make_sim(discord_mention_thread=True) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        await sim.mention(mina, general, f"相談です。電話は{PHONE}")  # opens a thread
        (thread,) = general.threads
        await yuu.send(thread, "ユウも参加します")
        await sim.mention(mina, general, "個人的な話")  # a second thread of her own
        await sim.archive()
        assert PHONE in await sim.stored_text()
        await sim.mention(mina, general, "メモ")
        result = await mina.slash(general, "memory add", text="コーヒーが苦手")
        assert result.ephemeral

        result = await mina.slash(general, "kb forget", scope="me")
        assert result.ephemeral
        answer = result.followups[0].content if result.followups else result.response.content
        assert answer.startswith("あなたのメッセージ") and "覚えていたこと 1件" in answer

        text = await sim.stored_text()
        assert PHONE not in text  # her words *and* the bot's echo of them
        assert "ユウも参加します" in text  # others' words in the shared thread stay
        assert "コーヒー" not in text
        assert await sim.db.list_memories(guild_id=guild.id, user_id=mina.id) == []
        await yuu.send(thread, "さっきの電話番号は？")
        assert PHONE not in sim.prompt() and "ユウも参加します" in sim.prompt()


async def test_a_deleted_thread_or_channel_takes_its_conversations(make_sim: SimFactory) -> None:
    async with make_sim(discord_mention_thread=True) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        other = guild.create_text_channel("other")
        mina = sim.member(guild, "ミナ")
        await sim.mention(mina, general, "スレッドの秘密の話")
        (thread,) = general.threads
        await sim.mention(mina, other, "別チャンネルの話")
        await sim.archive()

        await sim.as_moderator(lambda bot: bot.get_channel(thread.id).delete())  # type: ignore[union-attr]
        text = await sim.stored_text()
        assert "スレッドの秘密" not in text and "別チャンネルの話" in text

        await sim.as_moderator(lambda bot: bot.get_channel(other.id).delete())  # type: ignore[union-attr]
        assert "別チャンネルの話" not in await sim.stored_text()


async def test_memories_stay_with_their_owner_guild_and_dm(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        one, two = sim.guild("サーバーA"), sim.guild("サーバーB")
        ch1, ch2 = one.create_text_channel("a"), two.create_text_channel("b")
        mina, yuu = sim.member(one, "ミナ"), sim.member(one, "ユウ")
        mina_in_two = two.add_member(mina.user)
        admin = sim.member(one, "管理人", admin=True)
        # A model that does not repeat its prompt (the default echo would copy the
        # memories block into the history, where deleting the memory cannot reach).
        sim.api.reply = lambda body: "はい、どうぞ。"

        added = await mina.slash(ch1, "memory add", text="わたしはコーヒーが苦手です")
        assert added.ephemeral and added.response is not None
        assert added.response.content.startswith("覚えました（#")
        await yuu.slash(ch1, "memory add", text="ユウは猫を三匹飼っています")
        await mina_in_two.slash(ch2, "memory add", text="Bサーバーでは敬語で話して")
        await mina.user.slash("memory add", text="DMだけの秘密のメモ")

        await sim.mention(mina, ch1, "おすすめの飲み物は？")
        prompt = sim.prompt()
        assert "コーヒーが苦手" in prompt and "<memories" in prompt
        assert "猫を三匹" not in prompt and "敬語" not in prompt and "DMだけ" not in prompt
        await sim.mention(yuu, ch1, "おすすめの飲み物は？")
        prompt = sim.prompt()  # another user's turn never carries Mina's memories
        assert "猫を三匹" in prompt and "コーヒー" not in prompt
        await sim.mention(mina_in_two, ch2, "こんにちは")
        prompt = sim.prompt()  # another guild: only what she asked to remember there
        assert "敬語" in prompt and "コーヒー" not in prompt and "DMだけ" not in prompt
        await mina.user.send_dm("こんにちは")
        prompt = sim.prompt()
        assert "DMだけの秘密" in prompt and "コーヒー" not in prompt and "敬語" not in prompt

        listed = await mina.slash(ch1, "memory list")
        assert listed.ephemeral and listed.response is not None
        assert "コーヒーが苦手" in listed.response.content
        assert "猫" not in listed.response.content and "敬語" not in listed.response.content
        mine = await sim.db.list_memories(guild_id=one.id, user_id=mina.id)
        theirs = await sim.db.list_memories(guild_id=one.id, user_id=yuu.id)
        # Yuu cannot delete Mina's memory; an admin of the guild can; Mina can delete hers.
        denied = await yuu.slash(ch1, "memory delete", id=mine[0].memory_id)
        assert denied.response is not None and "見つかりませんでした" in denied.response.content
        assert len(await sim.db.list_memories(guild_id=one.id, user_id=mina.id)) == 1
        removed = await admin.slash(ch1, "memory delete", id=theirs[0].memory_id)
        assert removed.response is not None and "忘れました" in removed.response.content
        gone = await mina.slash(ch1, "memory delete", id=mine[0].memory_id)
        assert gone.response is not None and "忘れました" in gone.response.content
        await sim.mention(mina, ch1, "飲み物は？")
        assert "コーヒー" not in sim.prompt()
        assert len(await sim.db.list_memories(guild_id=two.id)) == 1  # the other guild's stays


async def test_memory_why_tells_history_references_links_and_memories(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        first = await sim.mention(yuu, general, "図書室は五時に閉まります")
        await sim.archive()
        await mina.slash(general, "memory add", text="本が好き")
        why = await mina.slash(general, "memory why")
        assert why.response is not None and why.response.content == texts.WHY_NONE

        sim.api.script("messages", [Reply(text="五時までですよ", usage=(321, 7))])
        await sim.mention(mina, general, "図書室は何時まで？")
        why = await mina.slash(general, "memory why")
        assert why.ephemeral and why.response is not None
        shown = why.response.content
        assert "会話の履歴: 0件" in shown  # her first turn here
        link = f"https://discord.com/channels/{guild.id}/{general.id}/{first.id}"
        assert link in shown  # the conversation knowledge links back to the message
        assert "本が好き" in shown and "入力 321 / 出力 7" in shown
        # Yuu's last answer is his own; a DM knows nothing of the guild's.
        yuus = await yuu.slash(general, "memory why")
        assert yuus.response is not None and "本が好き" not in yuus.response.content
        dm = await mina.user.slash("memory why")
        assert dm.response is not None and dm.response.content == texts.WHY_NONE


async def test_kb_search_links_conversation_knowledge_back_to_discord(
    make_sim: SimFactory,
) -> None:
    async with make_sim() as sim:
        guild, general, mina = sim.room()
        said = await sim.mention(mina, general, "文化祭の準備は金曜日です")
        await sim.archive()
        result = await mina.slash(general, "kb search", query="文化祭")
        assert result.ephemeral
        shown = result.followups[0].content if result.followups else result.response.content
        assert "文化祭の準備" in shown
        assert f"https://discord.com/channels/{guild.id}/{general.id}/{said.id}" in shown


async def test_kb_add_a_pdf_shows_progress_and_becomes_knowledge(make_sim: SimFactory) -> None:
    async with make_sim(embedding_batch_size=1) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        admin, member = sim.member(guild, "管理人", admin=True), sim.member(guild, "ミナ")
        pdf = make_pdf(["Library guide\nThe library closes at five.", "The cafe is on floor two."])

        refused = await member.slash(general, "kb add", file=("guide.pdf", pdf))
        assert refused.response is not None
        assert refused.response.content == texts.KB_ADD_NEEDS_ADMIN
        wrong = await admin.slash(general, "kb add", file=("photo.png", b"\x89PNG"))
        assert wrong.response is not None and ".pdf" in wrong.response.content

        done = await admin.slash(general, "kb add", file=("guide.pdf", pdf))
        assert done.ephemeral and done.response is not None
        assert done.response.content.startswith("✅ 「guide.pdf」を知識に追加しました")
        edits = sim.edits_of_original()
        assert edits[0].startswith("📥") and any(e.startswith("🧩") for e in edits)
        assert edits[-1] == done.response.content
        hits = await sim.chat.search(guild.id, general.id, "library closes")
        assert hits and "closes at five" in hits[0].hit.content
        again = await admin.slash(general, "kb add", file=("guide.pdf", pdf))
        assert again.response is not None and "同じ内容" in again.response.content

        scan = await admin.slash(general, "kb add", file=("scan.pdf", make_pdf([], blank_pages=1)))
        assert scan.response is not None and "no text layer" in scan.response.content


async def test_kb_add_refuses_a_file_over_the_size_limit(make_sim: SimFactory) -> None:
    async with make_sim(kb_add_max_bytes=100) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        admin = sim.member(guild, "管理人", admin=True)
        big = await admin.slash(general, "kb add", file=("big.txt", b"x" * 101))
        assert big.response is not None and "大きすぎます" in big.response.content
        assert await sim.db.list_sources() == []


async def test_daily_budgets_stop_llm_calls_at_the_limit(make_sim: SimFactory) -> None:
    async with make_sim(user_daily_token_budget=500, guild_daily_token_budget=1500) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        admin = sim.member(guild, "管理人", admin=True)
        sim.api.script("messages", [Reply(text="はい", usage=(450, 60))])
        await sim.mention(mina, general, "一回目")  # 510 tokens: over her 500
        await sim.mention(mina, general, "二回目")
        assert sim.llm_calls() == 1
        assert sim.bot_messages(general)[-1] == sim.chat.settings.budget_exceeded_message
        sim.api.script("messages", [Reply(text="どうぞ", usage=(900, 100))])
        await sim.mention(yuu, general, "ユウです")  # Yuu has his own budget: answered
        assert sim.llm_calls() == 2 and sim.bot_messages(general)[-1] == "どうぞ"
        await sim.mention(yuu, general, "もう一回")  # the guild's 1500 is used up now
        assert sim.llm_calls() == 2
        assert sim.bot_messages(general)[-1] == sim.chat.settings.budget_exceeded_message

        # The numbers are the provider's, per user, and the admin can see them.
        used = await sim.db.list_usage(since=sim.chat.usage.today(), until=sim.chat.usage.today())
        assert {(u.user_id, u.input_tokens, u.output_tokens) for u in used} == {
            (mina.id, 450, 60),
            (yuu.id, 900, 100),
        }
        report = await admin.slash(general, "kotonoha usage")
        assert report.ephemeral and report.response is not None
        assert "入力 1350 / 出力 160 トークン（計 1510）" in report.response.content
        assert f"<@{yuu.id}>: 1000 トークン" in report.response.content
        # Members do not even see /kotonoha; a channel moderator sees it but needs
        # Manage Server for the numbers.
        assert "kotonoha usage" not in mina.available_commands(general)
        moderator = guild.add_member(
            sim.env.create_user("mod"),
            roles=[
                guild.create_role("mods", permissions=discord.Permissions(manage_channels=True))
            ],
        )
        denied = await moderator.slash(general, "kotonoha usage")
        assert denied.response is not None and denied.response.content == texts.USAGE_NEEDS_ADMIN


@pytest.mark.parametrize("provider", ["openai"])
async def test_usage_comes_from_the_openai_compatible_servers_numbers(
    make_sim: SimFactory, provider: str
) -> None:
    async with make_sim(llm_provider=provider, openai_api_key="sk-test") as sim:
        guild, general, mina = sim.room()
        sim.api.script("chat", [Reply(text="ok", usage=(77, 5))])
        await sim.mention(mina, general, "hello")
        used = await sim.db.list_usage(since=sim.chat.usage.today(), until=sim.chat.usage.today())
        assert [
            (u.guild_id, u.user_id, u.input_tokens, u.output_tokens, u.calls) for u in used
        ] == [(guild.id, mina.id, 77, 5, 1)]


async def test_replies_cite_their_sources_only_when_asked(make_sim: SimFactory) -> None:
    async with make_sim(reply_cite_sources=True) as sim:
        guild = sim.guild()
        general = guild.create_text_channel("general")
        mina, yuu = sim.member(guild, "ミナ"), sim.member(guild, "ユウ")
        said = await sim.mention(yuu, general, "文化祭は金曜日です")
        await sim.chat.add_document(
            guild.id, "faq.md", "# 文化祭\n文化祭の会場は体育館です".encode()
        )
        await sim.archive()
        sim.api.script("messages", [Reply(text="金曜日の体育館です")])
        await sim.mention(mina, general, "文化祭はいつどこ？")
        shown = sim.bot_messages(general)[-1]
        assert shown.startswith("金曜日の体育館です\n\n-# 参考: ")
        assert f"<https://discord.com/channels/{guild.id}/{general.id}/{said.id}>" in shown
        assert "文化祭" in shown.split("参考: ")[1]  # the document by its title
        # What is stored (and sent as history later) is the answer without the footer.
        session = await sim.db.load_session(f"mention:{general.id}:{mina.id}")
        assert session is not None and session.messages[-1].content == "金曜日の体育館です"
    async with make_sim() as sim:  # off by default
        guild = sim.guild()
        general = guild.create_text_channel("general")
        await sim.chat.add_document(
            guild.id, "faq.md", "# 文化祭\n文化祭の会場は体育館です".encode()
        )
        await sim.mention(sim.member(guild, "ミナ"), general, "文化祭はどこ？")
        assert "参考:" not in sim.bot_messages(general)[-1]


async def test_messages_from_before_a_restart_are_followed_too(make_sim: SimFactory) -> None:
    """Raw events: a message the new process never cached is still edited or deleted."""
    from kotonoha_bot.bot.client import KotonohaBot

    async with make_sim() as sim:
        _guild, general, mina = sim.room()
        old_secret = await sim.mention(mina, general, "古い秘密はSAKURA")
        old_plan = await sim.mention(mina, general, "予定は月曜")
        await sim.archive()
        # A new process: the same storage and Discord, an empty message cache.
        fresh = KotonohaBot(sim.chat, sim.chat.settings)
        await sim.env.restart_bot(fresh)
        assert fresh.get_channel(general.id) is not None
        assert all(m.id not in (old_secret.id, old_plan.id) for m in fresh.cached_messages)

        await mina.delete(old_secret)
        await mina.edit(old_plan, f"{fresh.user.mention} 予定は火曜")  # type: ignore[union-attr]
        text = await sim.stored_text()
        assert "SAKURA" not in text and "月曜" not in text and "予定は火曜" in text


async def test_a_delete_during_a_storage_outage_is_retried_not_lost(
    fake_api: FakeAPIServer, tmp_path: Path
) -> None:
    """Another process holds SQLite's write lock when the delete arrives: it waits in
    the retry queue and is applied by the retry job once storage answers again."""
    import sqlite3

    from kotonoha_bot.db import open_database, sqlite_path_from_url
    from tests.bot.sim import sim_factory
    from tests.chat.support import chat_settings

    url = f"sqlite:///{tmp_path / 'outage.db'}"
    settings = chat_settings(tmp_path, sqlite_busy_timeout_ms=50)
    async with (
        open_database(url, settings=settings) as db,
        sim_factory(db, fake_api, tmp_path, [])(sqlite_busy_timeout_ms=50) as sim,
    ):
        _guild, general, mina = sim.room()
        secret = await sim.mention(mina, general, "消したい話KIWI")
        blocker = sqlite3.connect(sqlite_path_from_url(url), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process writing
        try:
            await mina.delete(secret)
            assert len(sim.bot.events.pending) == 1
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert "KIWI" in await sim.stored_text()  # not yet...
        assert await sim.bot.events.retry_failed() == 1
        assert "KIWI" not in await sim.stored_text()  # ...but not lost either
        assert not sim.bot.events.pending
