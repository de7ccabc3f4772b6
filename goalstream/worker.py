"""`goalstream worker`: read a batch, decode, evaluate, commit, then acknowledge and announce.

    XREADGROUP ──▶ decode (msgspec) ──▶ evaluate (in-memory index) ──▶ one SQL statement
         ▲                                                                   │ commit
         └──────────── XACK + dead letters + XADD workflow.goal.achieved ◀───┘

Nothing is acknowledged before its effects are committed. A server that fails is retried with
backoff, holding the batch, until it answers or the worker is told to stop; a batch whose
statement fails for a reason of its own is split, and the entries that fail alone are
dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import msgspec
import redis.asyncio as aioredis
import structlog

from goalstream.cache import GoalCache
from goalstream.consumer import StreamConsumer
from goalstream.evaluate import evaluate
from goalstream.events import Decoded, Entry, EventDecoder, Invalid
from goalstream.goals import Goal
from goalstream.metrics import Metrics, observe_many
from goalstream.outbox import relay_outbox
from goalstream.retry import classify, compute_backoff
from goalstream.settings import Settings
from goalstream.sink import (
    DELETE_PUBLISHED,
    Announcement,
    CommitResult,
    commit_batch,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

# How long each step of closing may take before it is abandoned.
_CLOSE_STEP_SECONDS = 3.0
# Batches read and evaluated ahead of the one being committed.
_PIPELINE_DEPTH = 2
# How often the worker relays orphaned outbox rows and samples the group's backlog.
_HOUSEKEEPING_SECONDS = 5.0


class Worker:
    """One consumer in the group, with its cache, its connections and its metrics."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stop = asyncio.Event()
        self.decoder = EventDecoder()
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=max(5.0, settings.block_ms / 1000 + 5)
        )
        self.consumer = StreamConsumer(self.redis, settings)
        self.cache = GoalCache(
            settings.database_url, self.metrics, refresh_seconds=settings.cache_refresh_seconds
        )
        self.pool: asyncpg.Pool | None = None
        self._conn: asyncpg.Connection | None = None
        self._published: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = False
        self.processed = 0
        self._burst = False

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to both servers, create the groups, and load the goal cache."""
        self.pool = await self._retry("postgres", self._create_pool)
        await self._retry("redis", self.consumer.ensure_groups)
        await self._retry("postgres", self.cache.start)
        self.ready = True
        self.metrics.ready.set(1)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        log.info(
            "worker started",
            consumer=self.consumer.name,
            group=self.settings.group,
            streams=list(self.settings.streams),
            goals=len(self.cache.index),
        )

    async def _create_pool(self) -> asyncpg.Pool:
        # Every statement of the hot path is an index lookup by design. A plan made while a
        # table was nearly empty (a fresh deployment, a new partition) can pick a sequential
        # scan and keep it as the tables grow: measured, a generic plan of that kind made the
        # batch statement some 25 times slower. Sequential scans are off for these sessions only.
        return await asyncpg.create_pool(
            self.settings.database_url,
            min_size=0,  # no floor to restore in the background while the server is away
            max_size=4,
            timeout=10,  # connect timeout: a black-holed server must not hang a retry
            server_settings={
                "application_name": "goalstream-worker",
                "enable_seqscan": "off",
            },
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.cache.close()
        # Each step is bounded: a server that stopped answering must not hold the exit.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush_published(), _CLOSE_STEP_SECONDS)
        await self._drop_commit_connection()
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), _CLOSE_STEP_SECONDS)
            except TimeoutError:
                self.pool.terminate()
        await self.redis.aclose()

    async def run(self, *, burst: bool = False) -> None:
        """Consume until `stop` is set; with `burst`, until the streams are drained.

        Three stages overlap: while one batch is committed, the next is read, decoded and
        evaluated, and the one before is settled (acknowledged and announced). Commits stay
        strictly in read order, one at a time; no batch is settled before its commit.
        """
        self._burst = burst
        await self.start()
        lanes = _Lanes()
        stages = [
            asyncio.create_task(self._commit_loop(lanes), name="committer"),
            asyncio.create_task(self._settle_loop(lanes), name="settler"),
        ]
        try:
            await self._relay_orphans()  # a previous life may have died before publishing
            await self._read_loop(lanes)
            await asyncio.gather(*stages)
            if self._burst:
                await self._relay_orphans()
        finally:
            lanes.abandon.set()
            for stage in stages:
                stage.cancel()
            for stage in stages:
                with contextlib.suppress(asyncio.CancelledError):
                    await stage
            await self.close()
            log.info("worker stopped", consumer=self.consumer.name, processed=self.processed)

    async def _read_loop(self, lanes: _Lanes) -> None:
        block = None if self._burst else self.settings.block_ms
        while not self.stop.is_set():
            entries = await self._retry("redis", lambda: self.consumer.read(block))
            if entries is None:
                break
            if entries:
                if not await lanes.offer(lanes.to_commit, self.prepare(entries)):
                    return  # a later stage gave up (stopped while retrying): so do we
                continue
            if lanes.to_commit.empty():
                await self._flush_published()
            if self._burst and self.consumer.caught_up:
                break
        await lanes.offer(lanes.to_commit, None)

    async def _commit_loop(self, lanes: _Lanes) -> None:
        while (batch := await lanes.take(lanes.to_commit)) is not None:
            if not await self.commit(batch):
                lanes.abandon.set()
                return
            if not await lanes.offer(lanes.to_settle, batch):
                return
        await lanes.offer(lanes.to_settle, None)

    async def _settle_loop(self, lanes: _Lanes) -> None:
        while (batch := await lanes.take(lanes.to_settle)) is not None:
            if not await self.settle(batch):
                lanes.abandon.set()
                return

    # -- one batch --------------------------------------------------------------------------

    def prepare(self, entries: Sequence[Entry]) -> Batch:
        """Decode and evaluate a batch: the in-memory part of the work."""
        started = time.perf_counter()
        batch_id = uuid.uuid4().hex[:12]
        self.metrics.batch_size.observe(len(entries))
        limit = self.settings.max_deliveries
        poison = [
            Invalid(
                e, f"delivered {e.deliveries} times, more than GOALSTREAM_MAX_DELIVERIES={limit}"
            )
            for e in entries
            if e.deliveries > limit
        ]
        fresh = [e for e in entries if e.deliveries <= limit] if poison else entries
        valid, invalid = self.decoder.decode_batch(fresh)
        invalid += poison
        self._count_received(valid, invalid)
        matches = evaluate(valid, self.cache.index)
        self.metrics.evaluations.inc(len(valid))
        bound = log.bind(batch_id=batch_id, entries=len(entries))
        return Batch(entries, valid, invalid, matches, bound, time.perf_counter() - started)

    async def commit(self, batch: Batch) -> bool:
        """Commit a prepared batch's effects; False if stopped before it committed."""
        started = time.perf_counter()
        outcome = await self._commit(batch.valid, batch.matches, batch.log)
        if outcome is None:
            return False
        batch.result, failed = outcome
        batch.dead = batch.invalid + failed
        batch.committed_at = time.time()
        # Matching in memory plus the eligibility check and write in SQL; not queueing time.
        elapsed = batch.evaluated_in + time.perf_counter() - started
        self.metrics.evaluation_latency.observe(elapsed)
        return True

    async def settle(self, batch: Batch) -> bool:
        """Dead-letter, acknowledge and announce a committed batch; False if stopped first."""
        result = batch.result
        assert result is not None, "settle() before commit()"
        settled = await self._retry(
            "redis", lambda: self.consumer.settle(batch.entries, batch.dead, result.announcements)
        )
        if settled is None:
            return False
        self._published.extend(a.outbox_id for a in result.announcements)
        self._record(batch, batch.dead, result, batch.committed_at)
        return True

    async def _commit(
        self,
        events: list[Decoded],
        matches: list[tuple[int, Goal]],
        bound: structlog.typing.FilteringBoundLogger,
    ) -> tuple[CommitResult, list[Invalid]] | None:
        """Commit the batch's effects; on an error of the data's own, isolate the culprits."""
        published: list[int] = []
        if matches:
            published, self._published = self._published, []
        try:
            result = await self._retry(
                "postgres", lambda: self._commit_once(events, matches, published)
            )
        except _EntryError as exc:
            self._published.extend(published)
            bound.warning("batch failed; retrying its events one by one", error=exc.reason)
            return await self._commit_each(events, matches)
        if result is None:
            self._published.extend(published)
            return None
        return result, []

    async def _commit_once(
        self, events: list[Decoded], matches: list[tuple[int, Goal]], published: list[int]
    ) -> CommitResult:
        conn = await self._commit_connection()
        try:
            return await commit_batch(conn, events, matches, published)
        except Exception as exc:
            kind = classify(exc)
            if kind == "entry":
                raise _EntryError(f"{type(exc).__name__}: {exc}") from exc
            if kind == "transient":
                await self._drop_commit_connection()
            raise

    async def _commit_connection(self) -> asyncpg.Connection:
        # The hot path keeps one connection: a pool's acquire/release would add a reset
        # round trip to every batch.
        if self._conn is None or self._conn.is_closed():
            assert self.pool is not None
            self._conn = await self.pool.acquire(timeout=10)
        return self._conn

    async def _drop_commit_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.release(conn, timeout=1)

    async def _commit_each(
        self, events: list[Decoded], matches: list[tuple[int, Goal]]
    ) -> tuple[CommitResult, list[Invalid]] | None:
        announcements: list[Announcement] = []
        exits = cancelled = 0
        failed: list[Invalid] = []
        by_event: dict[int, list[Goal]] = {}
        for position, goal in matches:
            by_event.setdefault(position, []).append(goal)
        for position, goals in by_event.items():
            one = [events[position]]
            pairs = [(0, g) for g in goals]
            try:
                result = await self._retry(
                    "postgres",
                    lambda one=one, pairs=pairs: self._commit_once(one, pairs, []),  # type: ignore[misc]
                )
            except _EntryError as exc:
                failed.append(Invalid(events[position].entry, f"processing failed: {exc.reason}"))
                continue
            if result is None:
                return None
            announcements += result.announcements
            exits += result.exits
            cancelled += result.cancelled
        return CommitResult(announcements, exits, cancelled), failed

    # -- bookkeeping ------------------------------------------------------------------------

    def _count_received(self, valid: list[Decoded], invalid: list[Invalid]) -> None:
        counts = Counter((d.entry.stream, d.event.type_name) for d in valid)
        counts.update((i.entry.stream, "invalid") for i in invalid)
        for (stream, event_type), n in counts.items():
            self.metrics.events_received.labels(stream, event_type).inc(n)

    def _record(
        self, batch: Batch, dead: list[Invalid], result: CommitResult, committed_at: float
    ) -> None:
        self.processed += len(batch.entries)
        bound = batch.log
        m = self.metrics
        # Entries of a batch share their commit, and many their millisecond: observe each
        # distinct latency once, with its count.
        for millis, n in Counter(e.millis for e in batch.entries).items():
            observe_many(m.end_to_end_latency, max(0.0, committed_at - millis / 1000), n)
        for invalid in dead:
            m.dead_letters.labels(_reason_label(invalid.reason)).inc()
            bound.warning(
                "entry dead-lettered",
                stream=invalid.entry.stream,
                entry_id=invalid.entry.entry_id,
                tenant_id=_tenant_of(invalid.entry),
                reason=invalid.reason,
            )
        if result.announcements:
            by_type = Counter(_goal_type_of(a.payload) for a in result.announcements)
            for goal_type, n in by_type.items():
                m.achievements.labels(goal_type).inc(n)
            m.announcements.inc(len(result.announcements))
        m.exits.inc(result.exits)
        m.cancelled_actions.inc(result.cancelled)
        bound.debug(
            "batch committed",
            valid=len(batch.valid),
            matches=len(batch.matches),
            achievements=len(result.announcements),
            exits=result.exits,
        )

    async def _flush_published(self) -> None:
        if not self._published or self.pool is None:
            return
        ids, self._published = self._published, []
        try:
            await self.pool.execute(DELETE_PUBLISHED, ids)
        except Exception as exc:  # the relay will publish these again: at least once is fine
            self.metrics.errors.labels("postgres").inc()
            log.warning("could not delete published outbox rows", error=repr(exc))

    async def _housekeeping(self) -> None:
        """Delete published outbox rows soon (before another worker's relay takes them for
        orphans); every few seconds, relay real orphans and sample the group's backlog."""
        orphan_age = self.settings.outbox_orphan_seconds
        interval = min(_HOUSEKEEPING_SECONDS, orphan_age)
        tick = min(1.0, orphan_age / 4)
        next_round = time.monotonic() + interval
        while True:
            await asyncio.sleep(tick)
            await self._flush_published()
            if time.monotonic() < next_round:
                continue
            next_round = time.monotonic() + interval
            # Sample first and on its own: while PostgreSQL is down (the relay fails) the
            # backlog gauges must keep moving, since that is when the backlog alerts matter.
            try:
                await self.sample_backlog()
            except Exception as exc:
                log.warning("backlog sampling failed; will retry", error=repr(exc))
            try:
                await relay_outbox(self.pool, self.consumer, orphan_age)
                await self.consumer.forget_stale_consumers(self.settings.stale_consumer_ms)
            except Exception as exc:
                log.warning("housekeeping failed; will retry", error=repr(exc))

    async def _relay_orphans(self) -> None:
        try:
            await relay_outbox(self.pool, self.consumer, self.settings.outbox_orphan_seconds)
        except Exception as exc:  # housekeeping tries again; nothing is lost meanwhile
            log.warning("outbox relay failed; will retry", error=repr(exc))

    async def sample_backlog(self) -> None:
        """Set the pending and lag gauges from XINFO GROUPS, now."""
        for stream, (pending, lag) in (await self.consumer.group_backlog()).items():
            self.metrics.consumer_pending.labels(stream).set(pending)
            if lag is not None:
                self.metrics.consumer_lag.labels(stream).set(lag)

    async def _retry(self, component: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run `call`, retrying transient failures with backoff; None if stopped meanwhile."""
        attempt = 0
        while True:
            try:
                # Once failing, a call must not outlive a stop: a connect to a dead server can
                # hang, and nothing is lost by abandoning it (nothing was acknowledged).
                result = await call() if attempt == 0 else await self._unless_stopped(call)
            except _Stopped:
                return None
            except Exception as exc:
                if classify(exc) != "transient":
                    raise
                self.metrics.errors.labels(component).inc()
                self.ready = False
                self.metrics.ready.set(0)
                delay = compute_backoff(attempt)
                log.warning(
                    f"{component} unavailable; retrying",
                    error=repr(exc),
                    attempt=attempt,
                    delay=round(delay, 3),
                )
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                if self.stop.is_set():
                    return None
                continue
            if attempt:
                log.info(f"{component} is back", attempts=attempt)
                self.ready = True
                self.metrics.ready.set(1)
            return result

    async def _unless_stopped(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await `call()`, but give up (raising _Stopped) as soon as the worker is stopped."""
        task = asyncio.ensure_future(call())
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise _Stopped
        return task.result()


class _Lanes:
    """The queues between the stages, and a flag any stage raises when it gives up (stopped
    while a server is away): then every stage stops waiting on the others."""

    def __init__(self) -> None:
        self.to_commit: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=_PIPELINE_DEPTH)
        self.to_settle: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=_PIPELINE_DEPTH)
        self.abandon = asyncio.Event()

    async def offer(self, queue: asyncio.Queue[Batch | None], item: Batch | None) -> bool:
        """Put `item` on `queue`; False if the pipeline is abandoned first."""
        return await self._race(queue.put(item)) is not _ABANDONED

    async def take(self, queue: asyncio.Queue[Batch | None]) -> Batch | None:
        """The next item of `queue`; None at its end or if the pipeline is abandoned."""
        item = await self._race(queue.get())
        return None if item is _ABANDONED else item  # type: ignore[return-value]

    async def _race(self, operation: Awaitable[T]) -> T | object:
        if self.abandon.is_set():
            if asyncio.iscoroutine(operation):
                operation.close()
            return _ABANDONED
        task = asyncio.ensure_future(operation)
        abandoned = asyncio.ensure_future(self.abandon.wait())
        try:
            await asyncio.wait({task, abandoned}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandoned.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return _ABANDONED


_ABANDONED = object()


class _Stopped(Exception):
    """The worker was stopped while a call was still retrying."""


@dataclass(slots=True)
class Batch:
    """A batch between the stages: its entries, decoded and evaluated, not yet committed."""

    entries: Sequence[Entry]
    valid: list[Decoded]
    invalid: list[Invalid]
    matches: list[tuple[int, Goal]]
    log: structlog.typing.FilteringBoundLogger
    evaluated_in: float  # seconds spent decoding and matching in memory
    result: CommitResult | None = None
    dead: list[Invalid] = field(default_factory=list)
    committed_at: float = 0.0


class _EntryError(Exception):
    """A statement failed because of the data it was given."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TenantOnly(msgspec.Struct):
    """Only an envelope's tenant, read leniently from an entry that failed (for log context)."""

    tenant_id: str | None = None


_TENANT_DECODER = msgspec.json.Decoder(_TenantOnly)


def _tenant_of(entry: Entry) -> str | None:
    """The tenant_id an entry's JSON names, when it can be read; never raises."""
    if entry.data is None:
        return None
    try:
        return _TENANT_DECODER.decode(entry.data).tenant_id
    except (msgspec.DecodeError, RecursionError):  # malformed, too deep, not an object, ...
        return None


def _reason_label(reason: str) -> str:
    if reason.startswith("delivered "):
        return "max_deliveries"  # the message carries the count: keep the label set small
    return reason.split(":", 1)[0].replace(" ", "_")[:40]


class _GoalTypeOnly(msgspec.Struct):
    """Only the goal type of an announcement (our own JSON), for the achievements counter."""

    goal_type: str = "unknown"


_GOAL_TYPE_DECODER = msgspec.json.Decoder(_GoalTypeOnly)


def _goal_type_of(payload: str) -> str:
    return _GOAL_TYPE_DECODER.decode(payload).goal_type
