"""The small error tree: what is worth retrying and what is not."""


class GoalstreamError(Exception):
    """Base class of every error goalstream raises on purpose."""


class TransientError(GoalstreamError):
    """A server is unreachable or busy; the same work will succeed later, so retry it."""


class PermanentError(GoalstreamError):
    """The work itself is bad; retrying it gives the same answer, so set it aside."""


class InvalidEvent(PermanentError):
    """A stream entry breaks the event contract; it goes to the dead-letter stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(GoalstreamError):
    """Settings or command-line flags are unusable; the process cannot start."""


class MigrationError(GoalstreamError):
    """A migration file was changed after it was applied, or failed to apply."""
