"""`goalstream trim`: drop old stream entries, never one that a consumer group still needs."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from goalstream.events import as_text, entry_id_key


def _after(entry_id: str) -> str:
    ms, seq = entry_id_key(entry_id)
    return f"{ms}-{seq + 1}"


async def safe_min_id(redis: aioredis.Redis, stream: str, cutoff_ms: int) -> str:
    """The MINID to trim to: the age cutoff, held back by every group's unfinished entries.

    An entry is still needed while a group has not yet delivered it (it is after the group's
    last-delivered id) or has delivered but not acknowledged it (it is in the group's PEL).
    """
    floor = f"{cutoff_ms}-0"
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return "0-0"  # no such stream
    if not groups:
        return "0-0"  # no group has started yet: a worker may still want all of it
    for group in groups:
        name = as_text(group["name"])
        bounds = [_after(as_text(group["last-delivered-id"]))]
        summary = await redis.xpending(stream, name)
        if summary["pending"]:
            bounds.append(as_text(summary["min"]))
        floor = min([floor, *bounds], key=entry_id_key)
    return floor


async def trim(redis: aioredis.Redis, streams: list[str], keep_days: float) -> dict[str, int]:
    """Trim each stream to entries younger than keep_days (as far as groups allow)."""
    cutoff_ms = int((time.time() - keep_days * 86400) * 1000)
    removed: dict[str, int] = {}
    for stream in streams:
        min_id = await safe_min_id(redis, stream, cutoff_ms)
        removed[stream] = int(await redis.xtrim(stream, minid=min_id, approximate=False))
    return removed
