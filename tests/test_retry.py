"""The retry policy: which failures are retried, which isolate an entry, which stop a worker."""

from __future__ import annotations

import asyncpg
import pytest
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from goalstream.errors import InvalidEvent, TransientError
from goalstream.retry import classify, compute_backoff


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(), "transient"),
        (TimeoutError(), "transient"),
        (TransientError("server away"), "transient"),
        (RedisConnectionError("reset"), "transient"),
        (RedisTimeoutError("slow"), "transient"),
        (BusyLoadingError("LOADING Redis is loading"), "transient"),
        (ResponseError("LOADING Redis is loading the dataset"), "transient"),
        (ResponseError("READONLY You can't write against a read only replica."), "transient"),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), "fatal"),
        (ResponseError("NOPERM this user has no permissions"), "fatal"),
        (asyncpg.ConnectionDoesNotExistError("closed"), "transient"),
        (asyncpg.CannotConnectNowError("starting up"), "transient"),
        (asyncpg.TooManyConnectionsError("too many"), "transient"),
        (asyncpg.SerializationError("retry"), "transient"),
        (asyncpg.DeadlockDetectedError("deadlock"), "transient"),
        (asyncpg.AdminShutdownError("shutdown"), "transient"),
        (asyncpg.UndefinedTableError("no table"), "transient"),
        (asyncpg.UntranslatableCharacterError("\\u0000"), "entry"),
        (asyncpg.InvalidTextRepresentationError("bad"), "entry"),
        (asyncpg.ForeignKeyViolationError("fk"), "entry"),
        (InvalidEvent("bad envelope"), "fatal"),
        (KeyError("bug"), "fatal"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    """Server trouble is retried, data PostgreSQL refuses isolates its entry, the rest stops."""
    assert classify(exc) == kind


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.1), (1, 0.2), (3, 0.8), (6, 6.4), (7, 10.0), (50, 10.0), (10_000, 10.0)],
)
def test_backoff_is_jittered_below_an_exponential_ceiling(attempt: int, ceiling: float) -> None:
    """Delays are random in [0, min(cap, base * 2^attempt)], so retries spread out."""
    delays = [compute_backoff(attempt) for _ in range(200)]
    assert all(0 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 100
    assert max(delays) > ceiling / 2
