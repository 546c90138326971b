"""Ingest under hostile folders and unlucky files, on both backends.

Symlinks out of the folder, Japanese legacy encodings, UTF-16, binary files, file names
that are not UTF-8, huge files: every file gets a per-file result and the rest go on.
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kotonoha_bot.db import DatabaseProtocol
from kotonoha_bot.knowledge.embeddings.hashing import HashingEmbeddingProvider
from kotonoha_bot.knowledge.files import UnreadableFileError, detect_encoding, discover
from kotonoha_bot.knowledge.ingest import ingest_paths
from kotonoha_bot.knowledge.search import search_knowledge
from tests.hostile.cases import CASES, MEETING, Case
from tests.hostile.runner import check_case
from tests.hostile.support import REPO

AREA = [c for c in CASES if c.area == "ingest"]
GUILD = 2


@pytest.mark.parametrize("case", AREA, ids=[c.slug for c in AREA])
def test_operator_case(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path / "work")


def write_bytes(name: bytes, data: bytes) -> None:
    with open(name, "wb") as f:
        f.write(data)


ENCODED = {
    "utf-8": MEETING.encode("utf-8"),
    "utf-8 with BOM": codecs.BOM_UTF8 + MEETING.encode("utf-8"),
    "Shift_JIS": MEETING.encode("shift_jis"),
    "CP932": (MEETING + "①②ｶﾀｶﾅ\n").encode("cp932"),
    "EUC-JP": MEETING.encode("euc_jp"),
    "ISO-2022-JP": MEETING.encode("iso2022_jp"),
    "UTF-16 LE with BOM": codecs.BOM_UTF16_LE + MEETING.encode("utf-16-le"),
    "UTF-16 BE with BOM": codecs.BOM_UTF16_BE + MEETING.encode("utf-16-be"),
    "UTF-16 LE, no BOM": ("# notes\n\nmeeting memo: " + MEETING).encode("utf-16-le"),
    "UTF-32 with BOM": MEETING.encode("utf-32"),
    "CRLF Shift_JIS": MEETING.replace("\n", "\r\n").encode("cp932"),
}


@pytest.mark.parametrize("raw", ENCODED.values(), ids=list(ENCODED))
async def test_japanese_in_any_common_encoding_is_found(
    raw: bytes, db: DatabaseProtocol, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "minutes.txt").write_bytes(raw)
    report = await ingest_paths(db, HashingEmbeddingProvider(), [corpus], guild_id=GUILD)
    assert report.failed == [] and len(report.added) == 1, report
    result = await search_knowledge(
        db, HashingEmbeddingProvider(), "会議", guild_id=GUILD, mode="keyword"
    )
    assert result.hits and "次回の会議は三月十日" in result.hits[0].hit.content
    assert "\ufffd" not in result.hits[0].hit.content


BINARY = {
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
    "gzip": b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4,
    "sqlite": b"SQLite format 3\x00" + b"\x00" * 4000,
    "controls, no NUL": bytes(range(1, 32)) * 200,
    "random": bytes((i * 197 + 13) % 251 + 1 for i in range(8000)),
}


@pytest.mark.parametrize("raw", BINARY.values(), ids=list(BINARY))
async def test_a_binary_file_is_refused_and_the_rest_go_on(
    raw: bytes, db: DatabaseProtocol, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "guide.md").write_text("# Guide\n\nThe bot remembers.\n", encoding="utf-8")
    (corpus / "data.txt").write_bytes(raw)  # a text suffix on a binary file
    report = await ingest_paths(db, None, [corpus, tmp_path / "missing.md"], guild_id=GUILD)
    assert [p for p, _ in report.failed] == ["corpus/data.txt"], report
    reason = report.failed[0][1]
    assert "binary" in reason or "encoding" in reason
    assert report.pending == ["corpus/guide.md"]
    assert ("missing.md", "no such file or directory") in [
        (Path(p).name, r) for p, r in report.skipped
    ]
    assert [s.uri for s in await db.list_sources(guild_id=GUILD)] == ["corpus/guide.md"]


async def test_symlinks_never_lead_out_of_the_folder(db: DatabaseProtocol, tmp_path: Path) -> None:
    secret = tmp_path / "private" / "diary.txt"
    secret.parent.mkdir()
    secret.write_text("my secret diary: kotonoha-private-marker\n", encoding="utf-8")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "guide.md").write_text("# Guide\n\nThe bot remembers.\n", encoding="utf-8")
    (corpus / "diary.txt").symlink_to(secret)
    (corpus / "sub" / "up.md").symlink_to("../../private/diary.txt")
    (corpus / "passwd.txt").symlink_to("/etc/passwd")
    (corpus / "inner.md").symlink_to(corpus / "guide.md")  # inside: allowed
    (corpus / "private").symlink_to(secret.parent)
    (corpus / "loop").symlink_to(corpus)
    report = await ingest_paths(db, None, [corpus], guild_id=GUILD)
    skipped = dict(report.skipped)
    for name in ("corpus/diary.txt", "corpus/sub/up.md", "corpus/passwd.txt"):
        assert "outside corpus" in skipped[name], skipped
    assert "not followed" in skipped["corpus/private"] and "not followed" in skipped["corpus/loop"]
    stored = ""
    for source in await db.list_sources():
        stored += " ".join(c.content for c in await db.list_chunks(source.source_id or 0))
    assert "kotonoha-private-marker" not in stored and "root:" not in stored
    assert sorted(report.pending) == ["corpus/guide.md", "corpus/inner.md"]


async def test_a_bad_file_name_stops_nothing(db: DatabaseProtocol, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for raw in (b"caf\xe9.md", b"\xff\xfe.txt", b"ok.md"):
        write_bytes(os.fsencode(corpus) + b"/" + raw, MEETING.encode())
    report = await ingest_paths(db, None, [corpus], guild_id=GUILD)
    assert report.failed == [] and len(report.pending) == 3, report
    uris = sorted(s.uri for s in await db.list_sources(guild_id=GUILD))
    assert uris == sorted(["corpus/caf\\xe9.md", "corpus/ok.md", "corpus/\\xff\\xfe.txt"])


async def test_a_large_file_is_streamed_in_segments_and_stored_whole(
    db: DatabaseProtocol, tmp_path: Path
) -> None:
    big = tmp_path / "big.md"
    parts = [f"# 章 {i}\n\n" + (f"第{i}章の会議の記録です。同じ文も繰り返します。\n\n" * 60)
             for i in range(40)]  # fmt: skip
    big.write_text("".join(parts), encoding="utf-8")
    embedder = HashingEmbeddingProvider()
    report = await ingest_paths(db, embedder, [big], guild_id=GUILD, segment_chars=4000)
    assert report.added == ["big.md"] and report.failed == []
    (source,) = await db.list_sources(guild_id=GUILD)
    chunks = await db.list_chunks(source.source_id or 0)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks))) and len(chunks) > 40
    assert len({c.chunk_key for c in chunks}) == len(chunks)  # repeated text, unique keys
    assert source.content_hash and source.status == "ready"
    assert {c.metadata.get("heading") for c in chunks} >= {"章 0", "章 39"}
    again = await ingest_paths(db, embedder, [big], guild_id=GUILD, segment_chars=4000)
    assert again.unchanged == ["big.md"]
    # An ingest that stopped before its last segment left no hash: it is redone.
    assert await db.set_source_hash(source.source_id or 0, "")
    redo = await ingest_paths(db, embedder, [big], guild_id=GUILD, segment_chars=4000)
    assert redo.updated == ["big.md"]
    assert len(await db.list_chunks(source.source_id or 0)) == len(chunks)


def test_detection_rule_refuses_what_it_cannot_tell(tmp_path: Path) -> None:
    odd = tmp_path / "odd.txt"
    odd.write_bytes(codecs.BOM_UTF8 + b"\xff\xfe broken")
    with pytest.raises(UnreadableFileError, match="byte-order mark"):
        detect_encoding(odd)
    mostly = tmp_path / "mostly.txt"
    mostly.write_bytes(("会議の記録 " * 500).encode() + b"\xff")
    assert detect_encoding(mostly).errors == "replace"
    found = discover([tmp_path])
    assert sorted(p.name for p in found.files) == ["mostly.txt", "odd.txt"]


@pytest.mark.slow
def test_a_large_file_needs_bounded_memory(tmp_path: Path) -> None:
    """8 MB of text: the peak stays near the interpreter's own (73 MiB; it was 167 MiB)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    para = "次回の会議は東京で行います。the meeting notes repeat here. " * 20 + "\n\n"
    with (corpus / "big.md").open("w", encoding="utf-8") as f:
        for i in range(8 * 1024 * 1024 // len(para.encode())):
            f.write((f"# 章 {i}\n\n" if i % 100 == 0 else "") + para)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), EMBEDDING_PROVIDER="hashing")
    env.pop("DATABASE_URL", None)
    # The command runs in a process of its own that reports its own peak. VmHWM, not
    # ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, large).
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['kotonoha', 'kb', 'ingest', 'corpus', '--guild', '1', '-d', 'sqlite:///k.db']\n"
        "try:\n    runpy.run_module('kotonoha_bot', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
        "print('peak', hwm[0].split()[1], code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    _, peak_kib, code = done.stdout.split()[-3:]
    assert code in ("0", "None"), done.stderr
    peak_mib = int(peak_kib) / 1024
    assert peak_mib < 120, f"peak {peak_mib:.0f} MiB"
