"""`goalstream dlq`: look at dead-lettered entries and requeue them after a fix."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from goalstream.events import as_text
from goalstream.settings import Settings


def with_occurred_at(data: bytes, entry_id: str) -> bytes:
    """The envelope, given the original entry's time as `occurred_at` if it had none.

    An event without `occurred_at` happened when its first entry was added; requeued, it would
    otherwise take the new entry's time, and could fall outside enrolments and windows.
    """
    millis = entry_id.partition("-")[0]
    if not millis.isdigit():
        return data
    try:
        envelope = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data  # not JSON: requeued as it was, to fail (or not) as it did
    if not isinstance(envelope, dict) or envelope.get("occurred_at") is not None:
        return data
    moment = datetime.fromtimestamp(int(millis) / 1000, tz=UTC)
    envelope["occurred_at"] = moment.isoformat().replace("+00:00", "Z")
    return msgspec.json.encode(envelope)


async def list_dead(
    redis: aioredis.Redis, settings: Settings, *, count: int = 100
) -> list[dict[str, str]]:
    """The oldest `count` dead letters, each with its DLQ id as `dlq_id`."""
    entries: Any = await redis.xrange(settings.dlq_stream, count=count)
    out = []
    for dlq_id, fields in entries:
        item = {as_text(k): as_text(v) for k, v in fields.items()}
        item["dlq_id"] = as_text(dlq_id)
        out.append(item)
    return out


async def requeue(
    redis: aioredis.Redis, settings: Settings, ids: list[str] | None = None
) -> list[tuple[str, str]]:
    """Put dead letters back on their original streams (all, or the given DLQ ids).

    Each is added to its stream and removed from the dead-letter stream in one MULTI/EXEC, so a
    crash never loses one (it can at worst be requeued twice, which the worker dedupes).
    Returns (dlq id, new entry id) pairs.
    """
    targets: Any
    if ids is None:
        targets = await redis.xrange(settings.dlq_stream)
    else:
        targets = []
        for dlq_id in ids:
            found: Any = await redis.xrange(settings.dlq_stream, dlq_id, dlq_id)
            if not found:
                raise KeyError(f"no dead letter with id {dlq_id}")
            targets += found
    moved: list[tuple[str, str]] = []
    for dlq_id, fields in targets:
        stream = as_text(fields[b"stream"])
        data = with_occurred_at(fields.get(b"data", b""), as_text(fields.get(b"entry_id", b"")))
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"data": data})
            pipe.xdel(settings.dlq_stream, dlq_id)
            new_id, _ = await pipe.execute()
        moved.append((as_text(dlq_id), as_text(new_id)))
    return moved
