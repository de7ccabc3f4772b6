"""The Redis side of the worker: the consumer group, reading batches, and settling them.

Settling a batch is one MULTI/EXEC: dead letters are added, every entry of the batch is
acknowledged, and the batch's achievements are announced. It is called only after the batch's
effects are committed in PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

from goalstream import constants
from goalstream.events import Entry, Invalid
from goalstream.settings import Settings
from goalstream.sink import Announcement

log = structlog.get_logger(__name__)


def parse_entries(reply: Any) -> list[Entry]:
    """Entries from an XREADGROUP reply (RESP2: [[stream, [(id, fields), ...]], ...])."""
    entries: list[Entry] = []
    for stream, items in reply or ():
        stream_name = stream.decode() if isinstance(stream, bytes) else stream
        for entry_id, fields in items:
            data = fields.get(constants.DATA_FIELD) if fields else None
            entries.append(Entry(stream_name, entry_id.decode(), data))
    return entries


class StreamConsumer:
    """One consumer of the group: reads its own pending entries first, then new ones."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.group = settings.group
        self.name = settings.consumer
        # Per stream, where the replay of our own pending entries has got to; None once done.
        self._pending_cursor: dict[str, str] = {s: "0" for s in settings.streams}

    @property
    def caught_up(self) -> bool:
        """True once this consumer's pending entries from before its start are all re-read."""
        return not self._pending_cursor

    async def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream itself) where it is missing."""
        for stream in self.settings.streams:
            try:
                await self.redis.xgroup_create(
                    stream, self.group, id=self.settings.group_start, mkstream=True
                )
                log.info("consumer group created", stream=stream, group=self.group)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, block_ms: int | None) -> list[Entry]:
        """The next batch: our own pending entries while any are left, then new entries."""
        count = self.settings.batch_size
        if self._pending_cursor:
            cursors: dict[KeyT, StreamIdT] = {k: v for k, v in self._pending_cursor.items()}
            reply = await self.redis.xreadgroup(self.group, self.name, cursors, count=count)
            entries = parse_entries(reply)
            got = {e.stream for e in entries}
            for entry in entries:
                self._pending_cursor[entry.stream] = entry.entry_id
            for stream in list(self._pending_cursor):
                if stream not in got:
                    del self._pending_cursor[stream]
            if entries:
                return entries
        streams: dict[KeyT, StreamIdT] = {s: ">" for s in self.settings.streams}
        reply = await self.redis.xreadgroup(
            self.group, self.name, streams, count=count, block=block_ms or None
        )
        return parse_entries(reply)

    async def settle(
        self,
        entries: Sequence[Entry],
        dead: Sequence[Invalid],
        announcements: Sequence[Announcement],
    ) -> bool:
        """Dead-letter, acknowledge and announce, atomically. Call only after the commit."""
        async with self.redis.pipeline(transaction=True) as pipe:
            now = _now_iso()
            for invalid in dead:
                pipe.xadd(self.settings.dlq_stream, self.dead_letter_fields(invalid, now))
            by_stream: dict[str, list[str]] = {}
            for entry in entries:
                by_stream.setdefault(entry.stream, []).append(entry.entry_id)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            for announcement in announcements:
                pipe.xadd(self.settings.achieved_stream, {"data": announcement.payload})
            await pipe.execute()
        return True

    def dead_letter_fields(self, invalid: Invalid, failed_at: str) -> dict[FieldT, EncodableT]:
        """The fields of a `goalstream.dlq` entry (CONTRACT 3)."""
        return {
            "stream": invalid.entry.stream,
            "entry_id": invalid.entry.entry_id,
            "data": invalid.entry.data if invalid.entry.data is not None else b"",
            "reason": invalid.reason,
            "deliveries": invalid.entry.deliveries,
            "consumer": self.name,
            "failed_at": failed_at,
        }

    async def publish(self, announcements: Sequence[Announcement]) -> None:
        """Announce achievements (used by the outbox relay)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for announcement in announcements:
                pipe.xadd(self.settings.achieved_stream, {"data": announcement.payload})
            await pipe.execute()

    async def group_backlog(self) -> dict[str, tuple[int, int | None]]:
        """Per stream, the group's (pending, lag) as XINFO GROUPS reports them."""
        out: dict[str, tuple[int, int | None]] = {}
        for stream in self.settings.streams:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue
            for group in groups:
                name = group.get("name")
                if name in (self.group, self.group.encode()):
                    lag = group.get("lag")
                    out[stream] = (int(group.get("pending", 0)), None if lag is None else int(lag))
        return out


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
