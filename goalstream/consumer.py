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
from goalstream.events import Entry, Invalid, as_text, entry_id_key
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
    """One consumer of the group.

    It reads, in this order of preference: its own pending entries left from before its start
    (re-claimed with XCLAIM, so the server counts the new delivery), then entries other
    consumers left idle for longer than `claim_idle_ms` (XAUTOCLAIM, following its cursor),
    then new entries (XREADGROUP >). Every entry carries the server's delivery count.
    """

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.group = settings.group
        self.name = settings.consumer
        # Per stream, how far the re-claim of our own pending entries has got; gone once done.
        self._own_cursor: dict[str, str] = {s: "-" for s in settings.streams}
        # Per stream, the XAUTOCLAIM cursor of the current claim round.
        self._claim_cursor: dict[str, str] = {}
        self._next_claim = 0.0
        self.claimed = 0

    @property
    def caught_up(self) -> bool:
        """True once this consumer's pending entries from before its start are all re-read."""
        return not self._own_cursor

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
        """The next batch: own pending entries, then idle entries of others, then new ones."""
        if self._own_cursor:
            entries = await self._reclaim_own()
            if entries:
                return entries
        if time.monotonic() >= self._next_claim:
            entries = await self.claim_idle()
            if entries:
                return entries
        streams: dict[KeyT, StreamIdT] = {s: ">" for s in self.settings.streams}
        try:
            reply = await self.redis.xreadgroup(
                self.group, self.name, streams, count=self.settings.batch_size, block=block_ms
            )
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            # The group (or stream) is gone: a Redis that lost its data, or an operator.
            log.warning("consumer group missing; creating it again", error=str(exc))
            await self.ensure_groups()
            return []
        return parse_entries(reply)

    async def _reclaim_own(self) -> list[Entry]:
        """Our own pending entries (a restart under the same name), one page per stream."""
        entries: list[Entry] = []
        for stream, cursor in list(self._own_cursor.items()):
            pending = await self.redis.xpending_range(
                stream, self.group, cursor, "+", self.settings.batch_size, self.name
            )
            if not pending:
                del self._own_cursor[stream]
                continue
            ids: list[StreamIdT] = [p["message_id"] for p in pending]
            self._own_cursor[stream] = "(" + as_text(ids[-1])
            claimed = await self.redis.xclaim(stream, self.group, self.name, 0, ids)
            counts = {as_text(p["message_id"]): int(p["times_delivered"]) + 1 for p in pending}
            entries += await self._with_counts(stream, claimed, counts, [as_text(i) for i in ids])
        return entries

    async def claim_idle(self) -> list[Entry]:
        """Take over entries that another consumer left pending for longer than claim_idle_ms."""
        entries: list[Entry] = []
        for stream in self.settings.streams:
            cursor = self._claim_cursor.get(stream, "0-0")
            reply = await self.redis.xautoclaim(
                stream,
                self.group,
                self.name,
                self.settings.claim_idle_ms,
                start_id=cursor,
                count=self.settings.batch_size,
            )
            next_cursor, claimed = as_text(reply[0]), reply[1]
            deleted = [as_text(i) for i in reply[2]] if len(reply) > 2 else []
            if deleted:  # Redis 7 already dropped them from the PEL; say so and move on
                log.warning("claimed entries were deleted", stream=stream, ids=deleted)
            if next_cursor == "0-0":
                self._claim_cursor.pop(stream, None)
            else:
                self._claim_cursor[stream] = next_cursor
            real = [as_text(i) for i, _ in claimed if i is not None]
            if not claimed:
                continue
            counts = await self._delivery_counts(stream, real)
            missing = None if len(real) == len(claimed) else (cursor, next_cursor)
            entries += await self._with_counts(stream, claimed, counts, real, missing)
        if not self._claim_cursor:  # a full round is done; the next starts in a while
            self._next_claim = time.monotonic() + self.settings.claim_idle_ms / 2000
        if entries:
            self.claimed += len(entries)
            log.info("claimed idle entries", count=len(entries), consumer=self.name)
        return entries

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        # Entries this consumer already holds can sit in the same id range: leave room for them.
        room = len(ids) + self.settings.batch_size * 8
        pending = await self.redis.xpending_range(
            stream,
            self.group,
            min(ids, key=entry_id_key),
            max(ids, key=entry_id_key),
            room,
            self.name,
        )
        return {as_text(p["message_id"]): int(p["times_delivered"]) for p in pending}

    async def _with_counts(
        self,
        stream: str,
        claimed: list[Any],
        counts: dict[str, int],
        requested: list[str],
        missing_range: tuple[str, str] | None = None,
    ) -> list[Entry]:
        """Entries from an XCLAIM/XAUTOCLAIM reply; entries deleted from the stream are acked."""
        entries = []
        for entry_id, fields in claimed:
            if entry_id is None:
                continue  # Redis 6.2: a deleted entry, found below by its absence
            text = as_text(entry_id)
            data = fields.get(constants.DATA_FIELD) if fields else None
            entries.append(Entry(stream, text, data, counts.get(text, 1)))
        returned = {e.entry_id for e in entries}
        gone = [i for i in requested if i not in returned]
        if missing_range is not None:
            gone += await self._own_pending_ids(stream, *missing_range)
        await self._ack_if_deleted(stream, [i for i in gone if i not in returned])
        return entries

    async def _own_pending_ids(self, stream: str, start: str, end: str) -> list[str]:
        """Our pending ids in [start, end) (Redis 6.2 hides deleted ones behind nil)."""
        upper = "+" if end == "0-0" else "(" + end
        pending = await self.redis.xpending_range(
            stream, self.group, start, upper, self.settings.batch_size * 4, self.name
        )
        return [as_text(p["message_id"]) for p in pending]

    async def _ack_if_deleted(self, stream: str, ids: list[str]) -> None:
        """Acknowledge pending ids whose entries no longer exist: there is nothing to process."""
        for entry_id in ids:
            if not await self.redis.xrange(stream, entry_id, entry_id):
                await self.redis.xack(stream, self.group, entry_id)
                log.warning("pending entry was deleted from the stream", stream=stream, id=entry_id)

    async def forget_stale_consumers(self, idle_ms: int) -> list[str]:
        """Remove consumers idle for longer than idle_ms that hold no pending entries."""
        removed = []
        for stream in self.settings.streams:
            try:
                consumers = await self.redis.xinfo_consumers(stream, self.group)
            except ResponseError:
                continue
            for consumer in consumers:
                name = as_text(consumer["name"])
                if name == self.name or int(consumer["pending"]) or int(consumer["idle"]) < idle_ms:
                    continue
                # Check and delete atomically: DELCONSUMER would drop pending entries.
                if await self._delete_if_idle(keys=[stream], args=[self.group, name]) >= 0:
                    removed.append(name)
                    log.info("stale consumer removed", stream=stream, consumer=name)
        return removed

    async def _delete_if_idle(self, keys: list[str], args: list[str]) -> int:
        script = self.redis.register_script(_DELETE_IF_NO_PENDING)
        return int(await script(keys=keys, args=args))

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


# Delete a consumer only if it holds no pending entries, atomically; -1 if it does.
_DELETE_IF_NO_PENDING = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
