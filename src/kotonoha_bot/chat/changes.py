"""After storage removed or changed messages (Discord edits/deletes, ``forget``): catch up.

Storage has already removed the messages and every chunk built from them in one
transaction (see ``DatabaseProtocol.delete_messages``). What is left for the pipeline:

1. the cached copies of the touched sessions are dropped, so the next prompt is built
   from what is stored — a deleted message never reaches a later prompt from memory;
2. the messages that shared a removed window are archived again without the removed
   one (:func:`kotonoha_bot.knowledge.archive.rearchive`), under the session's
   archiving lease so it never races the idle archiver.

Re-archiving is best effort: when it fails (the embedder is down: chunks are stored
pending; the database is down: logged) nothing removed comes back, and only some
knowledge of the surviving messages waits for the next change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kotonoha_bot.chat.sessions import SessionManager
from kotonoha_bot.config import Settings
from kotonoha_bot.db.base import DatabaseProtocol
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.knowledge.archive import ARCHIVE_LEASE_SECONDS, WORKER_ID, rearchive
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider

log = logging.getLogger("kotonoha_bot.chat")


async def catch_up(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    sessions: SessionManager,
    settings: Settings,
    *,
    touched: Sequence[str],
    rearchive_ids: Mapping[str, Sequence[int]],
) -> int:
    """Reload the touched sessions next time; archive the survivors again. Returns chunks."""
    for key in touched:
        sessions.invalidate(session_key=key)
    added = 0
    for key, ids in rearchive_ids.items():
        if not ids:
            continue
        lease = f"archive:{key}"
        try:
            if not await db.acquire_lease(lease, WORKER_ID, ARCHIVE_LEASE_SECONDS):
                log.info("re-archiving %s deferred: another process is archiving it", key)
                continue
            try:
                added += await rearchive(
                    db,
                    embedder,
                    key,
                    ids,
                    window=settings.archive_window_messages,
                    overlap=settings.archive_window_overlap,
                    batch_size=settings.embedding_batch_size,
                )
            finally:
                await db.release_lease(lease, WORKER_ID)
        except KotonohaError as exc:
            log.warning("re-archiving %s after a change failed: %s", key, exc)
    return added
