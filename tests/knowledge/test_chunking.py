"""Chunking: sentence-aware packing for Japanese and English, code blocks, overlap, keys."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from kotonoha_bot.errors import InvalidInputError, InvalidTextError
from kotonoha_bot.knowledge.chunking import (
    Chunk,
    chunk_text,
    content_hash,
    normalize_for_query,
    normalize_for_storage,
)
from kotonoha_bot.text import normalize_text

JAPANESE = (
    "来週の会議は東京の本社で行います。締切は金曜日の正午です！"
    "資料は共有フォルダに置いてください。質問があればチャンネルで聞いてね？"
    "「了解です。」と返事をもらえると助かります。議事録は山田さんが担当します。"
    "次回の開催地は大阪の予定です。"
)

ENGLISH = (
    "The next meeting is on Friday at 3.30 p.m. in the Kyoto office. "
    "Bring snacks, e.g. rice crackers or mochi, for the long session. "
    "Dr. Tanaka will present the roadmap for version 2.1 of the engine. "
    "J. R. R. Tolkien fans should join the reading group afterwards. "
    "Details are at https://example.com/wiki?page=meeting for everyone! "
    "Is the room booked already? Yes, Mr. Sato booked it on Monday."
)


def _check_invariants(text: str, chunks: list[Chunk], max_chars: int) -> str:
    """Properties every chunking must have; returns the normalised text."""
    norm = normalize_for_storage(text)
    for i, c in enumerate(chunks):
        assert c.index == i
        assert c.content == norm[c.start : c.end]
        assert c.content == c.content.strip()
        if not c.has_code:
            assert len(c.content) <= max_chars, (i, len(c.content))
    # Nothing is lost: every non-space character lies in some chunk.
    covered = [False] * len(norm)
    for c in chunks:
        for k in range(c.start, c.end):
            covered[k] = True
    missing = [k for k, ch in enumerate(norm) if not ch.isspace() and not covered[k]]
    assert not missing, norm[missing[0] : missing[0] + 20]
    # Chunks move forward.
    for a, b in itertools.pairwise(chunks):
        assert b.start > a.start and b.end > a.end
    return norm


def test_empty_and_blank_text_give_no_chunks() -> None:
    assert chunk_text("", max_chars=100) == []
    assert chunk_text(" \n\t\u3000\r\n  ", max_chars=100) == []


def test_japanese_sentences_are_kept_whole() -> None:
    chunks = chunk_text(JAPANESE, max_chars=40, overlap_chars=0, id_prefix="ja")
    _check_invariants(JAPANESE, chunks, 40)
    assert len(chunks) > 3
    for c in chunks:
        # Every chunk ends at a sentence end (。 ! ? or a closing quote after one).
        assert re.search(r"[。!?」]$", c.content), c.content
    # Each sentence lies whole inside one chunk.
    for sentence in re.findall(r".+?[。!?](?:」)?", normalize_text(JAPANESE)):
        if sentence.startswith("」"):
            continue
        assert any(sentence in c.content for c in chunks), sentence


def test_english_sentences_split_at_real_ends_only() -> None:
    # Each sentence is 50-75 characters, so two never fit and every chunk is one sentence.
    chunks = chunk_text(ENGLISH, max_chars=80, overlap_chars=0, id_prefix="en")
    _check_invariants(ENGLISH, chunks, 80)
    assert [c.content for c in chunks] == [
        "The next meeting is on Friday at 3.30 p.m. in the Kyoto office.",
        "Bring snacks, e.g. rice crackers or mochi, for the long session.",
        "Dr. Tanaka will present the roadmap for version 2.1 of the engine.",
        "J. R. R. Tolkien fans should join the reading group afterwards.",
        "Details are at https://example.com/wiki?page=meeting for everyone!",
        "Is the room booked already? Yes, Mr. Sato booked it on Monday.",
    ]


def test_numbered_list_lines_are_not_cut_after_the_number() -> None:
    text = "Agenda:\n1. Budget review for the spring event\n2. Venue options in Osaka"
    chunks = chunk_text(text, max_chars=45, overlap_chars=0)
    _check_invariants(text, chunks, 45)
    assert [c.content for c in chunks] == [
        "Agenda:",
        "1. Budget review for the spring event",
        "2. Venue options in Osaka",
    ] or [c.content for c in chunks] == [
        "Agenda:\n1. Budget review for the spring event",
        "2. Venue options in Osaka",
    ]


def test_mixed_japanese_and_english() -> None:
    text = (
        "# リリース計画\n\n"
        "次のビルドは v0.9.3 です。QA は Alice が担当します。"
        "The build uploads to Steam on Tuesday. 金曜日までに翻訳を終わらせてください！"
        "Questions? Ask in #dev-chat please.\n\n"
        "## 翻訳\n\n"
        "英語版の用語集は glossary.md にあります。Use it for every string."
    )
    chunks = chunk_text(text, max_chars=50, overlap_chars=15, id_prefix="mix")
    _check_invariants(text, chunks, 50)
    assert any("v0.9.3" in c.content for c in chunks)  # not cut at the version dots
    assert all(c.heading[0] == "リリース計画" for c in chunks)
    assert chunks[-1].heading == ("リリース計画", "翻訳")
    assert chunks[-1].location == "リリース計画 > 翻訳"
    # A heading starts a new chunk: no chunk holds text of both sections.
    for c in chunks:
        assert not ("Steam" in c.content and "glossary" in c.content)


def test_code_blocks_are_never_split() -> None:
    code_lines = [f"    print('line {i} of the setup script')" for i in range(12)]
    code = "```python\ndef setup():\n" + "\n".join(code_lines) + "\n```"
    text = (
        "Before you start, install the tools. Then run the script below.\n\n"
        + code
        + "\n\nAfter that the server starts. Check the logs for errors."
    )
    chunks = chunk_text(text, max_chars=80, overlap_chars=20, id_prefix="code")
    norm = _check_invariants(text, chunks, 80)
    with_code = [c for c in chunks if "```" in c.content]
    assert len(with_code) == 1
    block = with_code[0]
    assert block.has_code and len(block.content) > 80
    assert block.content.count("```") == 2
    assert "\n    print('line 11 of the setup script')\n```" in block.content
    # Indentation inside the fence survives normalisation; prose around it is normalised.
    assert "    print('line 0" in norm
    # No other chunk holds any line of the code.
    for c in chunks:
        if c is not block:
            assert "print(" not in c.content


def test_small_code_block_packs_with_its_sentence() -> None:
    text = "Run this:\n\n```\nmake test\n```\n\nIt takes a minute."
    chunks = chunk_text(text, max_chars=200, overlap_chars=0)
    assert len(chunks) == 1 and chunks[0].has_code
    assert chunks[0].content == "Run this:\n\n```\nmake test\n```\n\nIt takes a minute."


def test_overlap_repeats_whole_trailing_sentences() -> None:
    sentences = [f"Sentence number {i} talks about topic {i * 7}." for i in range(30)]
    text = " ".join(sentences)
    chunks = chunk_text(text, max_chars=200, overlap_chars=90, id_prefix="ov")
    norm = _check_invariants(text, chunks, 200)
    assert len(chunks) > 5
    for a, b in itertools.pairwise(chunks):
        shared = norm[b.start : a.end]
        assert b.start < a.end, "neighbours must overlap"
        assert len(shared) <= 90
        # The overlap is made of whole sentences: it starts where a sentence starts.
        assert shared.startswith("Sentence number "), shared
        assert shared.endswith(".")
        assert a.content.endswith(shared)
        assert b.content.startswith(shared)


def test_overlap_zero_gives_disjoint_chunks() -> None:
    text = " ".join(f"Line {i} is here." for i in range(100))
    chunks = chunk_text(text, max_chars=120, overlap_chars=0)
    _check_invariants(text, chunks, 120)
    for a, b in itertools.pairwise(chunks):
        assert b.start >= a.end


def test_an_over_long_sentence_is_hard_split() -> None:
    long_ja = "あ" * 130 + "、" + "い" * 200 + "。"
    long_en = " ".join(["word"] * 120)  # no sentence end at all
    for text in (long_ja, long_en):
        chunks = chunk_text(text, max_chars=100, overlap_chars=20)
        _check_invariants(text, chunks, 100)
        assert len(chunks) >= 4
    en_chunks = chunk_text(long_en, max_chars=100, overlap_chars=20)
    for c in en_chunks:
        # Cut at spaces: no chunk starts or ends inside a word.
        assert c.content.startswith("word") and c.content.endswith("word")
    for a, b in itertools.pairwise(en_chunks):
        assert 0 < a.end - b.start <= 20


def test_keys_are_stable_and_local() -> None:
    text = JAPANESE + "\n\n" + ENGLISH
    first = chunk_text(text, max_chars=120, overlap_chars=30, id_prefix="doc-1")
    again = chunk_text(text, max_chars=120, overlap_chars=30, id_prefix="doc-1")
    assert [c.chunk_key for c in first] == [c.chunk_key for c in again]
    assert len({c.chunk_key for c in first}) == len(first)
    other = chunk_text(text, max_chars=120, overlap_chars=30, id_prefix="doc-2")
    assert not {c.chunk_key for c in first} & {c.chunk_key for c in other}
    # Same text with other spacing / full-width forms normalises to the same keys.
    spaced = text.replace(". ", ".   ").replace("Kyoto", "Ｋｙｏｔｏ")
    spaced = spaced.replace("\n\n", "\r\n \r\n\r\n")
    assert spaced != text
    assert [
        c.chunk_key for c in chunk_text(spaced, max_chars=120, overlap_chars=30, id_prefix="doc-1")
    ] == [c.chunk_key for c in first]
    # Editing the end keeps the keys of the untouched beginning.
    edited = chunk_text(
        text + " One more line.", max_chars=120, overlap_chars=30, id_prefix="doc-1"
    )
    assert edited[0].chunk_key == first[0].chunk_key
    assert edited[-1].chunk_key != first[-1].chunk_key


def test_repeated_content_gets_distinct_keys() -> None:
    para = "Same paragraph, repeated on purpose."
    text = "\n\n".join([f"# Part {i}\n\n{para}" for i in range(3)])
    chunks = chunk_text(text, max_chars=40, overlap_chars=0)
    bodies = [c for c in chunks if c.content == para]
    assert len(bodies) == 3
    assert len({c.chunk_key for c in bodies}) == 3
    assert [c.heading for c in bodies] == [("Part 0",), ("Part 1",), ("Part 2",)]


def test_normalisation_rules() -> None:
    raw = "  Ｈｅｌｌｏ　　world\r\n\r\n\r\n\r\nｶﾀｶﾅ  です  \n```\n\tif x:\n\t    y()\n```\n"
    norm = normalize_for_storage(raw)
    assert normalize_for_storage(norm) == norm  # idempotent
    assert norm.startswith("Hello world\n\nカタカナ です")
    assert "\tif x:\n\t    y()" in norm  # code keeps its indentation
    listed = "- step one:\n\n  ```sh\n  cd app\n    make\n  ```"
    assert normalize_for_storage(listed) == "- step one:\n\n```sh\ncd app\n  make\n```"
    assert normalize_for_query("  Ｈｅｌｌｏ　　world ") == "Hello world"
    prose = "会議は\u3000東京で。\r\n\r\n\r\nNext  line."
    assert normalize_for_storage(prose) == normalize_text(prose)


def test_content_hash_follows_normalisation() -> None:
    assert content_hash("東京　会議") == content_hash("東京 会議  \n")
    assert content_hash("東京 会議") != content_hash("東京 会議室")
    assert len(content_hash("x")) == 64


def test_bad_input_is_rejected_with_typed_errors() -> None:
    with pytest.raises(InvalidTextError, match="NUL"):
        chunk_text("abc\x00def", max_chars=100, id_prefix="doc-nul")
    with pytest.raises(InvalidInputError, match="overlap_chars"):
        chunk_text("abc", max_chars=100, overlap_chars=100)
    with pytest.raises(InvalidInputError, match="max_chars"):
        chunk_text("abc", max_chars=0)


def test_metadata_is_json_ready() -> None:
    chunks = chunk_text("# Rules\n\nBe kind.\n\n```\ncode\n```", max_chars=100)
    assert chunks[0].metadata() == {
        "start": 0,
        "end": len(chunks[0].content),
        "heading": "Rules",
        "has_code": True,
    }


def test_invariants_hold_on_random_documents() -> None:
    import random

    rng = random.Random(20240601)
    pieces = [
        "東京で会議。",
        "締切は明日です!",
        "本当に?",
        "「はい。」",
        "Dr. Mori said hi.",
        "Version 3.2 ships soon.",
        "e.g. this one",
        "Why? Because.",
        "長い" * 40 + "。",
        "word " * 50,
        "\n\n",
        "\n",
        "# 見出し\n",
        "## Sub heading\n",
        "- list item\n",
        "```\ncode line\n  indented\n```\n",
        "https://example.com/x?y=1 ",
        "1. first\n",
    ]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        max_chars = rng.randint(5, 150)
        overlap = rng.randint(0, max_chars - 1)
        chunks = chunk_text(text, max_chars=max_chars, overlap_chars=overlap, id_prefix="r")
        _check_invariants(text, chunks, max_chars)
        assert chunks == chunk_text(text, max_chars=max_chars, overlap_chars=overlap, id_prefix="r")
        for a, b in itertools.pairwise(chunks):
            assert a.end - b.start <= overlap


EXAMPLES = Path(__file__).parents[2] / "examples"


def test_sample_corpus_chunks_cleanly_and_queries_point_at_real_files() -> None:
    corpus = EXAMPLES / "corpus"
    files = sorted(corpus.rglob("*.md"))
    assert len(files) >= 30
    for path in files:
        text = path.read_text(encoding="utf-8")
        chunks = chunk_text(text, max_chars=800, overlap_chars=100, id_prefix=path.name)
        assert chunks, path
        _check_invariants(text, chunks, 800)
    names = {str(p.relative_to(corpus)) for p in files}
    queries = json.loads((EXAMPLES / "queries.json").read_text(encoding="utf-8"))["queries"]
    assert len({q["id"] for q in queries}) == len(queries) >= 300
    conversations = json.loads((EXAMPLES / "conversations.json").read_text(encoding="utf-8"))
    names |= {f"session:{c['session_key']}" for c in conversations["conversations"]}
    for q in queries:
        assert q["class"] in {"keyword", "paraphrase", "crosslingual", "conversation", "no_answer"}
        assert q["lang"] in {"ja", "en"} and q["split"] in {"dev", "test"}
        assert set(q["relevant"]) <= names, q["id"]
        assert bool(q["relevant"]) == (q["class"] != "no_answer"), q["id"]
