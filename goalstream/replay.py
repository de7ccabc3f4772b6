"""`goalstream replay`: run a range of the streams through the same evaluation and the same
idempotent write as the live workers, without touching their consumer group (backfill).

Entries of several streams are merged in id order, so "the first event wins" means the same as
it does live. Replaying a range twice writes nothing the second time; replaying while live
workers run gives the same result as either alone.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

import asyncpg
import msgspec
import redis.asyncio as aioredis

from goalstream.cache import load_index
from goalstream.consumer import StreamConsumer
from goalstream.evaluate import evaluate
from goalstream.events import Decoded, Entry, EventDecoder, entry_id_key
from goalstream.goals import Goal
from goalstream.settings import Settings
from goalstream.sink import DELETE_PUBLISHED, CommitResult, commit_batch


class ReplaySummary(msgspec.Struct):
    """What a replay read and wrote (or, with dry_run, would have written: each batch is
    tried and rolled back on its own, so an enrolment two batches would exit counts twice)."""

    entries_read: int = 0
    invalid: int = 0
    skipped_other_tenant: int = 0
    failed: int = 0  # valid events PostgreSQL refused (e.g. a NUL in their JSON)
    matched_events: int = 0
    achievements: int = 0
    exits: int = 0
    cancelled_actions: int = 0
    dry_run: bool = False
    seconds: float = 0.0


def parse_position(value: str | None, *, default: str) -> str:
    """A stream position from an entry id (`1700000000000-0`, `(` for exclusive), milliseconds,
    or an RFC 3339 timestamp with offset."""
    if value is None or value in ("-", "+"):
        return value or default
    bare = value.removeprefix("(")  # "(" makes an id exclusive, as in XRANGE
    if bare.replace("-", "").isdigit() and bare.count("-") <= 1:
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a stream entry id nor an RFC 3339 timestamp"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {value!r} needs an offset, e.g. {value}Z")
    return str(int(moment.timestamp() * 1000))


def _millis(position: str, fallback: int) -> int:
    if position in ("-", "+"):
        return fallback
    return int(position.lstrip("(").split("-", 1)[0])


class _StreamReader:
    """Pages through one stream's range with XRANGE."""

    def __init__(self, redis: aioredis.Redis, stream: str, start: str, end: str, page: int):
        self.redis, self.stream, self.cursor, self.end, self.page = redis, stream, start, end, page
        self.buffer: list[Entry] = []
        self.done = False

    async def fill(self) -> None:
        if self.buffer or self.done:
            return
        rows: Any = await self.redis.xrange(self.stream, self.cursor, self.end, count=self.page)
        if len(rows) < self.page:
            self.done = True
        for entry_id, fields in rows:
            text = entry_id.decode()
            self.buffer.append(Entry(self.stream, text, fields.get(b"data")))
        if rows:
            self.cursor = "(" + self.buffer[-1].entry_id


async def _merged_batches(readers: list[_StreamReader], size: int) -> Any:
    """Batches of entries from all readers, in entry-id order across streams."""
    while True:
        for reader in readers:
            await reader.fill()
        live = [r for r in readers if r.buffer]
        if not live:
            return
        batch: list[Entry] = []
        while len(batch) < size and live:
            head = min(live, key=lambda r: entry_id_key(r.buffer[0].entry_id))
            batch.append(head.buffer.pop(0))
            if not head.buffer:
                await head.fill()
                live = [r for r in readers if r.buffer]
        yield batch


async def replay(
    settings: Settings,
    *,
    streams: list[str] | None = None,
    start: str = "-",
    end: str = "+",
    tenant: uuid.UUID | None = None,
    workflow: uuid.UUID | None = None,
    dry_run: bool = False,
    progress: Callable[[ReplaySummary, float], None] | None = None,
) -> ReplaySummary:
    """Replay [start, end] of the streams; return the summary."""
    started = time.monotonic()
    summary = ReplaySummary(dry_run=dry_run)
    redis = aioredis.Redis.from_url(settings.redis_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        index = await load_index(conn, tenant=tenant, workflow=workflow)
        publisher = StreamConsumer(redis, settings)
        decoder = EventDecoder()
        readers = [
            _StreamReader(redis, s, start, end, settings.batch_size)
            for s in (streams or list(settings.streams))
        ]
        first = _millis(start, 0)
        last = _millis(end, int(time.time() * 1000))
        published: list[int] = []
        async for entries in _merged_batches(readers, settings.batch_size):
            valid, invalid = decoder.decode_batch(entries)
            kept = [d for d in valid if tenant is None or d.event.tenant_id == tenant]
            summary.entries_read += len(entries)
            summary.invalid += len(invalid)
            summary.skipped_other_tenant += len(valid) - len(kept)
            matches = evaluate(kept, index)
            summary.matched_events += len({position for position, _ in matches})
            result = await _write(conn, kept, matches, published, dry_run, summary)
            published = []
            summary.achievements += len(result.announcements)
            summary.exits += result.exits
            summary.cancelled_actions += result.cancelled
            if result.announcements and not dry_run:
                await publisher.publish(result.announcements)
                published = [a.outbox_id for a in result.announcements]
            if progress is not None:
                done = (_millis(entries[-1].entry_id, last) - first) / max(1, last - first)
                progress(summary, min(1.0, max(0.0, done)))
        if published:
            await conn.execute(DELETE_PUBLISHED, published)
    finally:
        await conn.close()
        await redis.aclose()
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


async def _write(
    conn: asyncpg.Connection,
    events: list[Decoded],
    matches: list[tuple[int, Goal]],
    published: list[int],
    dry_run: bool,
    summary: ReplaySummary,
) -> CommitResult:
    """Commit a batch (or, dry, run it in a transaction rolled back at once, so no lock is
    held for long); an event PostgreSQL refuses is counted and skipped, not fatal."""
    try:
        return await _commit(conn, events, matches, published, dry_run)
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
        pass
    results = []
    for position in sorted({p for p, _ in matches}):
        one = [(0, goal) for p, goal in matches if p == position]
        try:
            results.append(await _commit(conn, [events[position]], one, [], dry_run))
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
            summary.failed += 1
    if published:
        await conn.execute(DELETE_PUBLISHED, published)
    return CommitResult(
        [a for r in results for a in r.announcements],
        sum(r.exits for r in results),
        sum(r.cancelled for r in results),
    )


async def _commit(
    conn: asyncpg.Connection,
    events: list[Decoded],
    matches: list[tuple[int, Goal]],
    published: list[int],
    dry_run: bool,
) -> CommitResult:
    if not dry_run:
        return await commit_batch(conn, events, matches, published)
    transaction = conn.transaction()
    await transaction.start()
    try:
        return await commit_batch(conn, events, matches, published)
    finally:
        await transaction.rollback()


def terminal_progress(stream: TextIO = sys.stderr) -> Callable[[ReplaySummary, float], None]:
    """A one-line progress bar with rate and ETA, redrawn in place on a terminal."""
    started = time.monotonic()

    def show(summary: ReplaySummary, fraction: float) -> None:
        elapsed = max(1e-6, time.monotonic() - started)
        rate = summary.entries_read / elapsed
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        filled = int(fraction * 30)
        stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%}  "
            f"{summary.entries_read:>10,} entries  {rate:>9,.0f}/s  ETA {eta:6.1f}s"
        )
        stream.flush()

    return show
