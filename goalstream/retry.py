"""Retry policy as pure functions: what kind of failure an exception is, and how long to wait.

transient  a server is away or busy: hold the work and retry it with backoff
entry      the data itself is refused (PostgreSQL data or constraint error): isolate it
fatal      anything else: stop loudly, an operator has to look
"""

from __future__ import annotations

import random
from typing import Literal

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from goalstream.errors import PermanentError, TransientError

Kind = Literal["transient", "entry", "fatal"]

# Redis replies that mean "not now" rather than "no".
_REDIS_WAIT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN")


def compute_backoff(attempt: int, *, base: float = 0.1, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter: a random delay in [0, min(cap, base * 2^attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


def classify(exc: BaseException) -> Kind:
    """'transient' (retry the same work), 'entry' (the data is at fault) or 'fatal'."""
    if isinstance(exc, PermanentError):
        return "fatal"
    if isinstance(exc, TransientError | OSError | TimeoutError | RedisConnectionError):
        return "transient"
    if isinstance(exc, RedisTimeoutError | asyncpg.InterfaceError):
        return "transient"
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.SerializationError
        | asyncpg.DeadlockDetectedError
        | asyncpg.QueryCanceledError
        | asyncpg.AdminShutdownError
        | asyncpg.LockNotAvailableError,
    ):
        return "transient"
    if isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
        return "entry"
    if isinstance(exc, ResponseError):
        # Redis said no. Loading, failing over, busy: wait. Anything else (a key of the wrong
        # type, a denied command) will say no forever, and retrying a half-applied MULTI would
        # repeat its other commands: stop loudly so an operator sees it.
        return "transient" if str(exc).startswith(_REDIS_WAIT_REPLIES) else "fatal"
    if isinstance(exc, RedisError | asyncpg.PostgresError):
        # Schema missing, permissions, and the like: not the entry's fault, and not fixed by
        # dead-lettering it. Hold the batch and retry; an operator has to act.
        return "transient"
    return "fatal"
