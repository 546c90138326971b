"""Splitting long replies into Discord messages."""

from __future__ import annotations

import random
import re

import pytest

from kotonoha_bot.bot.split import DISCORD_LIMIT, discord_length, split_message

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})", re.MULTILINE)


def fences_balanced(part: str) -> bool:
    return len(FENCE.findall(part)) % 2 == 0


def words_of(text: str) -> list[str]:
    """Non-fence content, for checking nothing is lost or invented."""
    return [w for w in re.sub(r"^[ \t]*(`{3,}|~{3,})\S*$", " ", text, flags=re.M).split()]


def test_short_text_is_one_message() -> None:
    assert split_message("こんにちは") == ["こんにちは"]
    assert split_message("") == [] and split_message("  \n ") == []
    exact = "あ" * DISCORD_LIMIT
    assert split_message(exact) == [exact]


def test_splits_between_paragraphs_first() -> None:
    para1, para2, para3 = "a" * 900, "b" * 900, "c" * 900
    parts = split_message(f"{para1}\n\n{para2}\n\n{para3}")
    assert parts == [f"{para1}\n\n{para2}", para3]


def test_a_long_paragraph_splits_between_sentences() -> None:
    sentence = "今日はとても良い天気ですね。" * 10  # 140 chars
    text = sentence * 20  # 2800 chars, one paragraph
    parts = split_message(text)
    assert len(parts) == 2
    assert all(p.endswith("。") for p in parts)
    assert "".join(parts) == text


def test_a_word_longer_than_a_message_is_cut() -> None:
    parts = split_message("x" * 4500, limit=2000)
    assert [len(p) for p in parts] == [2000, 2000, 500]


def test_code_block_is_kept_whole_when_it_fits() -> None:
    code = "```python\n" + "\n".join(f"print({i})" for i in range(100)) + "\n```"
    text = "説明です。" * 200 + "\n\n" + code + "\n\nおわり"
    parts = split_message(text)
    assert len(parts) == 2
    assert code in parts[1]  # moved whole to the next message, with what follows it
    assert parts[1].startswith("```python\n")
    assert all(fences_balanced(p) for p in parts)


def test_an_oversized_code_block_is_closed_and_reopened() -> None:
    lines = [f"    value_{i} = compute({i})  # コメント" for i in range(200)]
    text = "前置き\n```python\n" + "\n".join(lines) + "\n```\n後書き"
    parts = split_message(text)
    assert len(parts) >= 4
    code_parts = [p for p in parts if "```" in p]
    assert len(code_parts) >= 3
    for p in parts:
        assert discord_length(p) <= DISCORD_LIMIT
        assert fences_balanced(p), p[:80]
    for p in code_parts:
        body = p[p.index("```python") :]
        assert body.startswith("```python\n")
        assert body.endswith("\n```") or body.endswith("\n```\n後書き")
    joined = "\n".join(parts)
    for line in lines:
        assert line in joined  # no line lost, none cut (they are short)


def test_unclosed_fence_is_closed_in_every_part() -> None:
    text = "```\n" + "\n".join("y" * 50 for _ in range(100))
    parts = split_message(text)
    assert len(parts) > 1
    assert all(p.startswith("```\n") and p.endswith("\n```") for p in parts)


def test_tilde_fences_and_longer_backtick_fences() -> None:
    inner = "```\nnot a fence end\n```"
    text = "~~~~md\n" + (inner + "\n") * 120 + "~~~~"
    parts = split_message(text)
    for p in parts:
        assert p.startswith("~~~~md\n") and p.endswith("\n~~~~")


def test_surrogate_pairs_count_double() -> None:
    emoji = "😀" * 1500  # 3000 UTF-16 units
    parts = split_message(emoji)
    assert all(discord_length(p) <= DISCORD_LIMIT for p in parts)
    assert "".join(parts) == emoji


@pytest.mark.parametrize("seed", range(40))
def test_random_documents_respect_every_rule(seed: int) -> None:
    rng = random.Random(seed)
    blocks = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.3:
            lang = rng.choice(["", "python", "js"])
            n = rng.choice([3, 30, 150])
            body = "\n".join(
                "".join(rng.choice("abc xyz=()") for _ in range(rng.randint(0, 90)))
                for _ in range(n)
            )
            blocks.append(f"```{lang}\n{body}\n```")
        elif kind < 0.6:
            blocks.append(
                "。".join("本日は晴天なり" * rng.randint(1, 20) for _ in range(rng.randint(1, 40)))
            )
        else:
            blocks.append(" ".join("word" * rng.randint(1, 3) for _ in range(rng.randint(1, 400))))
    text = "\n\n".join(blocks)
    limit = rng.choice([100, 500, DISCORD_LIMIT])
    parts = split_message(text, limit=limit)
    assert parts
    for p in parts:
        assert discord_length(p) <= limit
        assert p.strip()
        assert fences_balanced(p)
    # Nothing lost: every non-fence word of the input appears, in order.
    original = "".join(words_of(text))
    rebuilt = "".join(words_of("\n".join(parts)))
    assert rebuilt == original
