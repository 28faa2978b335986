"""One error tree: callers catch ``SessiondError`` subclasses, never library exceptions."""

from __future__ import annotations


class SessiondError(Exception):
    """Root of every error sessiond raises on purpose."""


class InvalidEvent(SessiondError):
    """An event that no retry can fix: it goes to the dead-letter queue at once, with ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DependencyUnavailable(SessiondError):
    """PostgreSQL, Redis or RabbitMQ cannot be reached now; retrying later may succeed."""
