"""Recovery inside one worker: claiming others' idle entries, own pending entries, deleted
entries, poison entries, dead-letter requeue, trimming, and replay (real Redis and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import pytest
from redis.exceptions import ResponseError

from goalstream import constants
from goalstream.dlq import list_dead, requeue
from goalstream.replay import parse_position, replay
from goalstream.trim import trim
from tests.conftest import World

pytestmark = pytest.mark.e2e

TAG = constants.TAG_ADDED


async def read_as(world: World, consumer: str) -> list[str]:
    """Deliver every new entry to `consumer` (which then 'dies' without acknowledging)."""
    s = world.settings
    for stream in s.streams:
        with contextlib.suppress(ResponseError):  # the group exists already
            await world.redis.xgroup_create(stream, s.group, id="0", mkstream=True)
    reply = await world.redis.xreadgroup(s.group, consumer, {k: ">" for k in s.streams})
    return [i.decode() for _, items in reply for i, _ in items]


async def tagged_world(world: World, n: int) -> list[object]:
    wf = await world.workflow()
    await world.goal(wf, "tag_added", {"tag": "x"})
    contacts = []
    for _ in range(n):
        contact = await world.contact()
        await world.enroll(wf, contact)
        await world.send(TAG, contact, {"tag": "x"})
        contacts.append(contact)
    return contacts


async def test_idle_entries_of_a_dead_consumer_are_claimed(world: World) -> None:
    """Entries a dead consumer left pending are claimed after claim_idle_ms and processed."""
    await tagged_world(world, 3)
    assert len(await read_as(world, "dead-one")) == 3
    await asyncio.sleep(0.2)
    worker = await world.run_worker(claim_idle_ms=100)
    assert worker.consumer.claimed == 3
    assert len(await world.achievements()) == 3
    assert await world.pending() == 0


async def test_entries_not_idle_long_enough_are_left_alone(world: World) -> None:
    """A live consumer's entries (not idle for claim_idle_ms) are not taken from it."""
    await tagged_world(world, 2)
    await read_as(world, "alive")
    worker = await world.run_worker(claim_idle_ms=60_000)
    assert worker.consumer.claimed == 0
    assert await world.achievements() == []
    assert await world.pending() == 2


async def test_poison_entry_is_dead_lettered_after_max_deliveries(world: World) -> None:
    """An entry delivered more than max_deliveries times goes to the DLQ; requeue brings it back."""
    contacts = await tagged_world(world, 1)
    s = world.settings
    [entry_id] = await read_as(world, "crasher")
    stream = world.stream(TAG)
    for attempt in range(s.max_deliveries - 1):  # others took it and died, again and again
        await world.redis.xclaim(stream, s.group, f"crasher-{attempt}", 0, [entry_id])
    await asyncio.sleep(0.05)
    await world.run_worker(claim_idle_ms=10)
    dead = await world.dead_letters()
    assert [d["entry_id"] for d in dead] == [entry_id]
    assert f"delivered {s.max_deliveries + 1} times" in dead[0]["reason"]
    assert dead[0]["deliveries"] == str(s.max_deliveries + 1)
    assert await world.achievements() == []
    assert await world.pending() == 0

    listed = await list_dead(world.redis, s)
    moved = await requeue(world.redis, s, [listed[0]["dlq_id"]])
    assert len(moved) == 1
    assert await world.dead_letters() == []
    await world.run_worker()
    rows = await world.achievements()
    assert [r["contact_id"] for r in rows] == contacts


async def test_requeue_all_and_unknown_id(world: World) -> None:
    """`requeue` with no ids moves every dead letter; an unknown id is an error."""
    for _ in range(3):
        await world.send_raw(TAG, b"{broken")
    await world.run_worker()
    assert len(await world.dead_letters()) == 3
    assert len(await requeue(world.redis, world.settings)) == 3
    assert await world.redis.xlen(world.stream(TAG)) == 6
    with pytest.raises(KeyError):
        await requeue(world.redis, world.settings, ["1-1"])


async def test_deleted_pending_entries_are_acknowledged(world: World) -> None:
    """Pending entries deleted from the stream (own or claimed) are acknowledged, not stuck."""
    await tagged_world(world, 4)
    mine = await read_as(world, world.settings.consumer)
    stream = world.stream(TAG)
    await world.redis.xdel(stream, mine[0])
    await tagged_world(world, 2)
    theirs = await read_as(world, "dead-one")
    await world.redis.xdel(stream, theirs[0])
    await asyncio.sleep(0.1)
    await world.run_worker(claim_idle_ms=50)
    assert len(await world.achievements()) == 4
    assert await world.pending() == 0


async def test_stale_consumers_without_pending_are_removed(world: World) -> None:
    """Idle consumers with nothing pending are removed; one holding entries never is."""
    from goalstream.consumer import StreamConsumer

    await tagged_world(world, 1)
    await read_as(world, "holder")
    s = world.settings
    await world.redis.xgroup_createconsumer(world.stream(TAG), s.group, "idle-empty")
    await asyncio.sleep(0.05)
    consumer = StreamConsumer(world.redis, s)
    removed = await consumer.forget_stale_consumers(idle_ms=10)
    assert removed == ["idle-empty"]
    names = {
        c["name"].decode() for c in await world.redis.xinfo_consumers(world.stream(TAG), s.group)
    }
    assert "holder" in names


async def test_trim_keeps_what_groups_still_need(world: World) -> None:
    """Trimming by age never removes entries that are undelivered or unacknowledged."""
    stream = world.stream(TAG)
    s = world.settings
    await world.redis.xgroup_create(stream, s.group, id="0", mkstream=True)
    for i in range(6):
        await world.redis.xadd(stream, {"data": b"{}"}, id=f"{1000 + i}-0")
    await world.redis.xreadgroup(s.group, "c", {stream: ">"}, count=4)  # 1000..1003 delivered
    await world.redis.xack(stream, s.group, "1000-0", "1001-0")  # 1002, 1003 pending
    removed = await trim(world.redis, [stream], keep_days=0)
    assert removed == {stream: 2}
    left = [i.decode() for i, _ in await world.redis.xrange(stream)]
    assert left == ["1002-0", "1003-0", "1004-0", "1005-0"]
    await world.redis.xack(stream, s.group, "1002-0", "1003-0")
    await trim(world.redis, [stream], keep_days=0)
    assert [i.decode() for i, _ in await world.redis.xrange(stream)] == ["1004-0", "1005-0"]


async def test_replay_applies_new_goal_to_history_once(world: World) -> None:
    """Replay applies a goal created after the events to them, only after enrolment, once."""
    now = datetime.now(UTC)
    wf = await world.workflow()
    early, late = await world.contact(), await world.contact()
    await world.enroll(wf, early, enrolled_at=now - timedelta(hours=1), pending_actions=1)
    await world.enroll(wf, late, enrolled_at=now + timedelta(hours=1))
    await world.send(TAG, early, {"tag": "vip"}, occurred_at=now)
    await world.send(TAG, late, {"tag": "vip"}, occurred_at=now)
    await world.send_raw(TAG, b"not json")
    await world.goal(wf, "tag_added", {"tag": "vip"})

    dry = await replay(world.settings, dry_run=True)
    assert (dry.achievements, dry.exits, dry.entries_read, dry.invalid) == (1, 1, 3, 1)
    assert await world.achievements() == []

    first = await replay(world.settings)
    assert (first.achievements, first.exits, first.cancelled_actions) == (1, 1, 1)
    rows = await world.achievements()
    assert [r["contact_id"] for r in rows] == [early]
    assert len(await world.announced()) == 1
    second = await replay(world.settings)
    assert second.achievements == 0
    assert len(await world.achievements()) == 1
    assert await world.redis.xinfo_groups(world.stream(TAG)) == []  # the live group untouched


async def test_replay_filters_by_tenant_workflow_and_range(world: World) -> None:
    """Replay honours --tenant, --workflow and the start/end range."""
    from goalstream import seed

    wf1, wf2 = await world.workflow(), await world.workflow()
    contact = await world.contact()
    await world.enroll(wf1, contact, enrolled_at=datetime(2020, 1, 1, tzinfo=UTC))
    await world.enroll(wf2, contact, enrolled_at=datetime(2020, 1, 1, tzinfo=UTC))
    await world.goal(wf1, "form_submitted", {"form_id": "f"}, mode="measure")
    await world.goal(wf2, "form_submitted", {"form_id": "f"}, mode="measure")
    other = await seed.tenant(world.db, "other")
    first = await world.send("form.submitted", contact, {"form_id": "f"})
    await world.send("form.submitted", contact, {"form_id": "f"}, tenant_id=other)

    none = await replay(world.settings, tenant=other)
    assert none.achievements == 0 and none.skipped_other_tenant == 1
    only_wf1 = await replay(world.settings, workflow=wf1, end=first)
    assert only_wf1.achievements == 1 and only_wf1.entries_read == 1
    rest = await replay(world.settings, start="(" + first)
    assert rest.entries_read == 1 and rest.achievements == 0
    assert {r["workflow_id"] for r in await world.achievements()} == {wf1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1700000000000-5", "1700000000000-5"),
        ("1700000000000", "1700000000000"),
        ("2023-11-14T22:13:20Z", "1700000000000"),
        ("2023-11-14T23:13:20+01:00", "1700000000000"),
        (None, "-"),
    ],
)
def test_parse_position(text: str | None, expected: str) -> None:
    """Replay positions are entry ids, milliseconds, or RFC 3339 times with an offset."""
    assert parse_position(text, default="-") == expected


@pytest.mark.parametrize("text", ["yesterday", "2023-11-14T22:13:20"])
def test_parse_position_refuses_nonsense(text: str) -> None:
    """A position that is no id and no zoned time is refused with a clear message."""
    with pytest.raises(ValueError):
        parse_position(text, default="-")


def test_requeue_keeps_the_original_time() -> None:
    """A requeued envelope without occurred_at gets its first entry's time; others are kept."""
    import msgspec

    from goalstream.dlq import with_occurred_at

    plain = msgspec.json.encode({"id": "e", "data": {}})
    stamped = msgspec.json.decode(with_occurred_at(plain, "1700000000000-3"))
    assert stamped["occurred_at"] == "2023-11-14T22:13:20Z"
    own = msgspec.json.encode({"id": "e", "occurred_at": "2020-01-01T00:00:00Z"})
    assert with_occurred_at(own, "1700000000000-3") == own
    assert with_occurred_at(b"{broken", "1700000000000-3") == b"{broken"


async def test_trim_leaves_streams_no_group_has_read(world: World) -> None:
    """A stream without a consumer group is not trimmed: a worker may still want all of it."""
    stream = world.stream(TAG)
    await world.redis.xadd(stream, {"data": b"{}"}, id="1000-0")
    assert await trim(world.redis, [stream], keep_days=0) == {stream: 0}
    assert await world.redis.xlen(stream) == 1
