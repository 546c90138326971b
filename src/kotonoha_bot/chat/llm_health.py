"""How the LLM has been answering this process: the last success and the last failure.

The pipeline notes every call's outcome (:meth:`LLMHealth.ok`, :meth:`LLMHealth.failed`);
the health server's ``/ready`` details and the dashboard's status page show it. It
never gates readiness: a model that is down makes the bot apologise, not restart. The
failure text is the ``LLMError`` message, which names provider and status, never a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kotonoha_bot.models import utcnow
from kotonoha_bot.redact import redact


@dataclass
class LLMHealth:
    """The last outcomes of LLM calls in this process."""

    provider: str = ""
    model: str = ""
    last_ok_at: datetime | None = None
    last_error_at: datetime | None = None
    last_error: str = ""
    calls: int = 0
    failures: int = 0

    def ok(self) -> None:
        """A call answered."""
        self.calls += 1
        self.last_ok_at = utcnow()

    def failed(self, exc: BaseException) -> None:
        """A call failed after the SDK's retries."""
        self.calls += 1
        self.failures += 1
        self.last_error_at = utcnow()
        self.last_error = redact(str(exc))[:300]

    @property
    def state(self) -> str:
        """``unknown`` (no call yet), ``ok`` or ``failing`` (the latest call failed)."""
        if self.last_ok_at is None and self.last_error_at is None:
            return "unknown"
        if self.last_error_at is not None and (
            self.last_ok_at is None or self.last_error_at > self.last_ok_at
        ):
            return "failing"
        return "ok"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``/ready`` details)."""
        return {
            "state": self.state,
            "provider": self.provider,
            "model": self.model,
            "last_ok_at": self.last_ok_at.isoformat() if self.last_ok_at else None,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
            "last_error": self.last_error or None,
            "calls": self.calls,
            "failures": self.failures,
        }
