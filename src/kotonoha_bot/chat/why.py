"""What the bot's last answer to someone used (``/memory why``).

After every answered turn the pipeline notes, for the speaker in that scope (a guild,
or their DMs), how much history it sent, which knowledge hits (chunk, label, score)
and which of the speaker's memories went into the prompt, and the tokens the provider
reported; with the relevance judge on, also whether it decided (or why the references
passed unjudged) and which hits it judged out. Only ids, labels and scores are kept
— no message text — so a message deleted later does not live on here; links are
looked up when asked (a deleted chunk then shows as gone).

The notes live in this process's memory (the last answer since it started; the
newest :data:`MAX_TRACES` people): with several bot processes on one PostgreSQL, the
process that answered is the one that knows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from kotonoha_bot.chat.judge import Judgement, Verdict
from kotonoha_bot.chat.prompt import describe_source
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.knowledge.search import RankedHit
from kotonoha_bot.llm.base import LLMReply
from kotonoha_bot.models import Memory, Message, MessageLink

#: People whose last answer is remembered (least recently answered are dropped first).
MAX_TRACES = 10_000


@dataclass(frozen=True, slots=True)
class TracedReference:
    """One knowledge hit put into the prompt."""

    chunk_id: int
    label: str
    score: float
    conversation: bool


@dataclass(frozen=True, slots=True)
class AnswerTrace:
    """What went into one answer."""

    at: datetime
    session_key: str
    history_messages: int
    session_messages: int
    references: tuple[TracedReference, ...]
    memory_ids: tuple[int, ...]
    model: str
    input_tokens: int
    output_tokens: int
    #: The relevance judge: ``off``, ``judged`` (its choice applied) or why it did not
    #: decide (``timeout``, ``error``, ``budget``, ``unparsed``: references unjudged).
    judge: Verdict = "off"
    #: Hits the judge read and left out of the prompt.
    judged_out: tuple[TracedReference, ...] = ()


def _traced(hits: Sequence[RankedHit]) -> tuple[TracedReference, ...]:
    return tuple(
        TracedReference(
            chunk_id=h.hit.chunk_id,
            label=describe_source(h.hit),
            score=h.score,
            conversation=h.hit.metadata.get("kind") in ("conversation", "summary"),
        )
        for h in hits
    )


def answer_trace(
    *,
    at: datetime,
    session_key: str,
    messages: Sequence[Message],
    history_from: int,
    turn_size: int,
    hits: Sequence[RankedHit],
    memories: Sequence[Memory],
    reply: LLMReply,
    judgement: Judgement | None = None,
) -> AnswerTrace:
    """The trace of an answer just stored: ``messages`` ends with this turn (its user
    messages and the reply, ``turn_size`` in all); history was sent from ``history_from``."""
    before = messages[: len(messages) - turn_size]
    return AnswerTrace(
        at=at,
        session_key=session_key,
        history_messages=sum(1 for m in before[history_from:] if m.role != "system"),
        session_messages=sum(1 for m in before if m.role != "system"),
        references=_traced(hits),
        memory_ids=tuple(m.memory_id for m in memories if m.memory_id is not None),
        model=reply.model,
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
        judge=judgement.verdict if judgement else "off",
        judged_out=_traced(judgement.judged_out) if judgement else (),
    )


class TraceBook:
    """The last :class:`AnswerTrace` per (scope, user)."""

    def __init__(self, max_traces: int = MAX_TRACES) -> None:
        self._traces: OrderedDict[tuple[int | None, int], AnswerTrace] = OrderedDict()
        self._max = max_traces

    def note(self, guild_id: int | None, user_id: int, trace: AnswerTrace) -> None:
        """Remember ``trace`` as the user's last answer in that scope."""
        key = (guild_id, user_id)
        self._traces[key] = trace
        self._traces.move_to_end(key)
        while len(self._traces) > self._max:
            self._traces.popitem(last=False)

    def last(self, guild_id: int | None, user_id: int) -> AnswerTrace | None:
        """The user's last answer in that scope, if this process gave one."""
        return self._traces.get((guild_id, user_id))

    def forget(self, guild_id: int | None, user_id: int | None = None) -> None:
        """Drop the notes of a scope (or one user's there) after a forget."""
        for key in [k for k in self._traces if k[0] == guild_id]:
            if user_id is None or key[1] == user_id:
                del self._traces[key]


def format_citations(hits: Sequence[RankedHit], links: Mapping[int, MessageLink]) -> str:
    """The sources line appended to a reply (``REPLY_CITE_SOURCES``): links or titles."""
    parts = []
    for i, ranked in enumerate(hits, 1):
        link = links.get(ranked.hit.chunk_id)
        # <...> keeps Discord from unfurling every link into an embed.
        parts.append(f"[{i}] <{link.url}>" if link else f"[{i}] {describe_source(ranked.hit)}")
    return "\n\n-# 参考: " + " ・ ".join(parts)


@dataclass(frozen=True, slots=True)
class ExplainedReference:
    """A traced reference as it stands now: its link, or gone when deleted since."""

    label: str
    score: float
    link: MessageLink | None
    gone: bool


@dataclass(frozen=True, slots=True)
class Explanation:
    """What ``/memory why`` shows: the trace with links and memories looked up now."""

    trace: AnswerTrace
    references: tuple[ExplainedReference, ...]
    memories: tuple[Memory, ...]
    memories_deleted: int


async def explain(
    db: DatabaseProtocol, trace: AnswerTrace, *, guild_id: int | None, user_id: int
) -> Explanation:
    """Resolve a trace: links of conversation references, the memories still there."""
    conv_ids = [r.chunk_id for r in trace.references if r.conversation]
    origins = await db.chunk_origins(conv_ids) if conv_ids else {}
    references = tuple(
        ExplainedReference(
            label=r.label,
            score=r.score,
            link=origins[r.chunk_id].first_link if r.chunk_id in origins else None,
            # A conversation chunk always has provenance; none means it was deleted.
            gone=r.conversation and r.chunk_id not in origins,
        )
        for r in trace.references
    )
    current = {
        m.memory_id: m
        for m in await db.list_memories(guild_id=guild_id, user_id=user_id, limit=500)
    }
    kept = tuple(current[i] for i in trace.memory_ids if i in current)
    return Explanation(trace, references, kept, len(trace.memory_ids) - len(kept))
