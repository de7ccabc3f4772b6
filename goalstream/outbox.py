"""Announcements that a worker committed but did not live to publish.

Each achievement's announcement is written to `goalstream_outbox` in the same statement as the
achievement. The worker that committed it publishes it right after, then deletes the row; a row
older than `outbox_orphan_seconds` was left by a worker that died in between, and any worker
relays it. Consumers of `workflow.goal.achieved` dedupe on the achievement id.
"""

from __future__ import annotations

import asyncpg
import structlog

from goalstream.consumer import StreamConsumer
from goalstream.sink import DELETE_PUBLISHED, Announcement

log = structlog.get_logger(__name__)


async def relay_outbox(
    pool: asyncpg.Pool | None, consumer: StreamConsumer, older_than_seconds: float
) -> int:
    """Publish outbox rows left behind by a worker that died after its commit; return count."""
    if pool is None:
        return 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT id, payload FROM goalstream_outbox"
            " WHERE created_at < now() - make_interval(secs => $1)"
            " ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED",
            older_than_seconds,
        )
        if not rows:
            return 0
        await consumer.publish([Announcement(r["id"], r["payload"]) for r in rows])
        await conn.execute(DELETE_PUBLISHED, [r["id"] for r in rows])
    log.info("relayed orphaned announcements", count=len(rows))
    return len(rows)
