"""The worker end to end against real Redis and PostgreSQL, in burst mode."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from goalstream import constants
from tests.conftest import World

pytestmark = pytest.mark.e2e

TAG = constants.TAG_ADDED
PAY = constants.PAYMENT_COMPLETED
FORM = constants.FORM_SUBMITTED


async def test_goal_met_records_exits_cancels_and_announces(world: World) -> None:
    """A matching event writes one achievement, exits, cancels actions and waits, announces."""
    wf = await world.workflow()
    contact = await world.contact()
    enrollment = await world.enroll(wf, contact, pending_actions=2, waits=1)
    goal = await world.goal(wf, "tag_added", {"tag": "VIP"})
    other = await world.contact()
    await world.enroll(wf, other, pending_actions=1)

    await world.send(TAG, contact, {"tag": "vip"})
    await world.send(TAG, other, {"tag": "not-vip"})
    await world.run_worker()

    rows = await world.achievements()
    assert [(r["goal_config_id"], r["workflow_enrollment_id"]) for r in rows] == [
        (goal, enrollment)
    ]
    row = await world.enrollment(enrollment)
    assert (row["status"], row["exit_reason"]) == ("exited", "goal_achieved")
    assert row["exited_at"] is not None
    actions = await world.actions(enrollment)
    assert {(a["kind"], a["status"], a["cancel_reason"]) for a in actions} == {
        ("action", "cancelled", "goal_achieved"),
        ("wait", "cancelled", "goal_achieved"),
    }
    assert len(actions) == 3
    announced = await world.announced()
    assert len(announced) == 1
    assert announced[0]["id"] == str(rows[0]["id"])
    assert announced[0]["cancelled_actions"] == 3
    assert announced[0]["type"] == "workflow.goal.achieved"
    assert announced[0]["goal_type"] == "tag_added"
    assert announced[0]["mode"] == "exit"
    assert announced[0]["enrollment_id"] == str(enrollment)
    assert await world.pending() == 0
    assert await world.db.fetchval("SELECT count(*) FROM goalstream_outbox") == 0


async def test_same_event_twice_gives_one_achievement(world: World) -> None:
    """A redelivered event, or a batch processed twice, writes one achievement."""
    wf = await world.workflow()
    contact = await world.contact()
    await world.enroll(wf, contact)
    await world.goal(wf, "form_submitted", {"form_id": "f1"}, mode="measure")
    for _ in range(2):
        await world.send(FORM, contact, {"form_id": "f1"}, event_id="same")
    await world.run_worker()
    await world.redis.delete(*world.settings.streams)
    await world.send(FORM, contact, {"form_id": "f1"}, event_id="same")
    await world.run_worker()
    assert len(await world.achievements()) == 1
    assert len(await world.announced()) == 1


async def test_two_exit_goals_in_one_batch_exit_once(world: World) -> None:
    """Two exit goals met in one batch: one exit, one achievement, for the first event."""
    wf = await world.workflow()
    contact = await world.contact()
    enrollment = await world.enroll(wf, contact, pending_actions=1)
    first = await world.goal(wf, "tag_added", {"tag": "a"})
    await world.goal(wf, "form_submitted", {"form_id": "f"})
    await world.send(TAG, contact, {"tag": "a"})
    await world.send(FORM, contact, {"form_id": "f"})
    await world.run_worker()
    rows = await world.achievements()
    assert [r["goal_config_id"] for r in rows] == [first]
    assert (await world.enrollment(enrollment))["status"] == "exited"


async def test_measure_goal_keeps_enrollment_active(world: World) -> None:
    """A measure goal records an achievement and leaves the enrolment and its actions alone."""
    wf = await world.workflow()
    contact = await world.contact()
    enrollment = await world.enroll(wf, contact, pending_actions=2)
    await world.goal(wf, "purchase_made", {"min_amount": "10"}, mode="measure")
    await world.send(PAY, contact, {"amount": 10, "currency": "USD"})
    await world.run_worker()
    assert len(await world.achievements()) == 1
    assert (await world.enrollment(enrollment))["status"] == "active"
    assert {a["status"] for a in await world.actions(enrollment)} == {"pending"}
    assert (await world.announced())[0]["cancelled_actions"] == 0


@pytest.mark.parametrize(
    "case",
    [
        "before_enrollment",
        "outside_window",
        "other_tenant",
        "inactive_goal",
        "inactive_workflow",
        "exited_enrollment",
        "completed_enrollment",
        "deleted_goal",
        "other_contact",
    ],
)
async def test_ineligible_events_write_nothing(world: World, case: str) -> None:
    """Events the contract excludes write no achievement, change no enrolment, announce nothing."""
    now = datetime.now(UTC)
    wf = await world.workflow(is_active=case != "inactive_workflow")
    contact = await world.contact()
    status = {"exited_enrollment": "exited", "completed_enrollment": "completed"}.get(
        case, "active"
    )
    enrollment = await world.enroll(
        wf, contact, enrolled_at=now - timedelta(hours=1), status=status, pending_actions=1
    )
    window = 60 if case == "outside_window" else None
    goal = await world.goal(
        wf,
        "tag_added",
        {"tag": "x"},
        is_active=case != "inactive_goal",
        conversion_window_seconds=window,
    )
    if case == "deleted_goal":
        await world.db.execute("UPDATE workflow_goals SET deleted_at = now() WHERE id = $1", goal)
    occurred = now - timedelta(hours=2) if case == "before_enrollment" else now
    sender = await world.contact() if case == "other_contact" else contact
    tenant = None
    if case == "other_tenant":
        from goalstream import seed

        tenant = await seed.tenant(world.db, "other")
    await world.send(TAG, sender, {"tag": "x"}, occurred_at=occurred, tenant_id=tenant)
    await world.run_worker()
    assert await world.achievements() == []
    assert (await world.enrollment(enrollment))["status"] == status
    assert await world.announced() == []
    assert await world.pending() == 0


async def test_conversion_window_inclusive(world: World) -> None:
    """An event inside the conversion window counts; the window's end is inclusive."""
    enrolled = datetime(2026, 1, 1, tzinfo=UTC)
    wf = await world.workflow()
    contact = await world.contact()
    await world.enroll(wf, contact, enrolled_at=enrolled)
    await world.goal(wf, "tag_added", {"tag": "x"}, conversion_window_seconds=3600)
    await world.send(TAG, contact, {"tag": "x"}, occurred_at=enrolled + timedelta(seconds=3600))
    await world.run_worker()
    assert len(await world.achievements()) == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"type": "contact.tag.added", "tenant_id": "x"}', "invalid event"),
        (None, "no `data` field"),
        (b'{"type": "contact.exploded", "id": "1"}', "invalid event"),
        (b'{"junk": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed JSON"),
    ],
)
async def test_invalid_entries_are_dead_lettered(
    world: World, payload: bytes | None, reason: str
) -> None:
    """An invalid entry goes to the DLQ with its reason; later valid entries are processed."""
    wf = await world.workflow()
    contact = await world.contact()
    await world.enroll(wf, contact)
    await world.goal(wf, "tag_added", {"tag": "x"})
    bad_id = await world.send_raw(TAG, payload)
    await world.send(TAG, contact, {"tag": "x"})
    await world.run_worker()
    dead = await world.dead_letters()
    assert len(dead) == 1
    assert dead[0]["entry_id"] == bad_id
    assert dead[0]["stream"] == world.stream(TAG)
    assert reason in dead[0]["reason"]
    assert dead[0]["data"] == (payload or b"").decode(errors="replace")
    assert dead[0]["consumer"] == world.settings.consumer
    assert len(await world.achievements()) == 1
    assert await world.pending() == 0


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"amount": -1, "currency": "USD"}, "amount"),
        ({"amount": "lots", "currency": "USD"}, "amount"),
        ({"amount": 5, "currency": "US"}, "currency"),
        ({"currency": "USD"}, "amount"),
        ({"amount": True, "currency": "USD"}, "amount"),
    ],
)
async def test_wrong_payload_types_name_the_field(
    world: World, data: dict[str, object], field: str
) -> None:
    """A payload with a missing or mistyped field is dead-lettered, the reason naming it."""
    contact = await world.contact()
    await world.send(PAY, contact, data)
    await world.run_worker()
    dead = await world.dead_letters()
    assert len(dead) == 1
    assert field in dead[0]["reason"]


async def test_entry_the_database_rejects_is_isolated(world: World) -> None:
    """A valid event whose data PostgreSQL refuses (a NUL in JSON) is dead-lettered alone."""
    wf = await world.workflow()
    c1, c2 = await world.contact(), await world.contact()
    await world.enroll(wf, c1)
    await world.enroll(wf, c2)
    await world.goal(wf, "tag_added", {"tag_pattern": "x*"})
    await world.send(TAG, c1, {"tag": "x\u0000y"})
    await world.send(TAG, c2, {"tag": "xz"})
    await world.run_worker()
    dead = await world.dead_letters()
    assert len(dead) == 1
    assert "processing failed" in dead[0]["reason"]
    rows = await world.achievements()
    assert [r["contact_id"] for r in rows] == [c2]
    assert await world.pending() == 0


async def test_pending_entries_are_reread_on_start(world: World) -> None:
    """Entries a consumer read but never acknowledged are processed when it starts again."""
    wf = await world.workflow()
    contact = await world.contact()
    await world.enroll(wf, contact)
    await world.goal(wf, "tag_added", {"tag": "x"})
    await world.send(TAG, contact, {"tag": "x"})
    s = world.settings
    for stream in s.streams:
        await world.redis.xgroup_create(stream, s.group, id="0", mkstream=True)
    read = await world.redis.xreadgroup(s.group, s.consumer, {k: ">" for k in s.streams})
    assert read, "the entry was delivered (and left pending)"
    assert await world.pending() == 1
    await world.run_worker()
    assert len(await world.achievements()) == 1
    assert await world.pending() == 0


async def test_orphaned_outbox_rows_are_relayed(world: World) -> None:
    """An announcement committed but never published (worker died) is published later."""
    from goalstream.consumer import StreamConsumer
    from goalstream.outbox import relay_outbox

    await world.db.execute(
        "INSERT INTO goalstream_outbox (achievement_id, payload, created_at)"
        " VALUES (gen_random_uuid(), '{\"id\": \"a1\"}', now() - interval '1 minute')"
    )
    import asyncpg

    pool = await asyncpg.create_pool(world.settings.database_url, min_size=1, max_size=1)
    try:
        sent = await relay_outbox(pool, StreamConsumer(world.redis, world.settings), 10)
    finally:
        await pool.close()
    assert sent == 1
    assert await world.announced() == [{"id": "a1"}]
    assert await world.db.fetchval("SELECT count(*) FROM goalstream_outbox") == 0


async def test_invalid_utf8_is_dead_lettered(world: World) -> None:
    """An event with invalid UTF-8 (even in a key the contract ignores) is dead-lettered alone."""
    wf = await world.workflow()
    c1, c2 = await world.contact(), await world.contact()
    await world.enroll(wf, c1)
    await world.enroll(wf, c2)
    await world.goal(wf, "tag_added", {"tag": "x"})
    body = (
        b'{"id": "e1", "type": "contact.tag.added", "tenant_id": "%s", "contact_id": "%s",'
        b' "junk": "\xff\xfe", "data": {"tag": "x"}}'
    ) % (str(world.tenant_id).encode(), str(c1).encode())
    bad = await world.send_raw(TAG, body)
    await world.send(TAG, c2, {"tag": "x"})
    await world.run_worker()
    dead = await world.dead_letters_raw()
    assert [d[b"entry_id"].decode() for d in dead] == [bad]
    assert b"not UTF-8" in dead[0][b"reason"]
    assert dead[0][b"data"] == body
    assert [r["contact_id"] for r in await world.achievements()] == [c2]


async def test_goal_switched_from_measure_to_exit_does_not_exit_silently(world: World) -> None:
    """A goal already achieved as `measure`, switched to `exit`, neither exits the enrolment
    nor writes anything: an exit always comes with an achievement and an announcement."""
    wf = await world.workflow()
    contact = await world.contact()
    enrollment = await world.enroll(wf, contact, pending_actions=1)
    goal = await world.goal(wf, "tag_added", {"tag": "x"}, mode="measure")
    await world.send(TAG, contact, {"tag": "x"})
    await world.run_worker()
    await world.db.execute("UPDATE workflow_goals SET mode = 'exit' WHERE id = $1", goal)
    await world.send(TAG, contact, {"tag": "x"})
    await world.run_worker()
    assert len(await world.achievements()) == 1
    assert (await world.enrollment(enrollment))["status"] == "active"
    assert len(await world.announced()) == 1


async def test_cancelled_actions_are_announced_once(world: World) -> None:
    """One event meeting a measure goal and an exit goal: only the exit's announcement
    carries the cancelled actions, so consumers summing them count each once."""
    wf = await world.workflow()
    contact = await world.contact()
    await world.enroll(wf, contact, pending_actions=2, waits=1)
    await world.goal(wf, "tag_added", {"tag": "x"}, mode="measure")
    await world.goal(wf, "tag_added", {"tag_pattern": "x*"}, mode="exit")
    await world.send(TAG, contact, {"tag": "x"})
    await world.run_worker()
    announced = {a["mode"]: a["cancelled_actions"] for a in await world.announced()}
    assert announced == {"measure": 0, "exit": 3}


async def test_published_announcements_are_not_announced_again(world: World) -> None:
    """Outbox rows are deleted soon after publishing, even when no later batch has a match,
    so another worker's relay never takes them for orphans."""
    import asyncio
    import contextlib

    from goalstream.worker import Worker

    wf = await world.workflow()
    contact = await world.contact()
    await world.enroll(wf, contact)
    await world.goal(wf, "tag_added", {"tag": "x"})
    worker = Worker(msgspec.structs.replace(world.settings, outbox_orphan_seconds=2.0))
    task = asyncio.create_task(worker.run())
    try:
        await world.send(TAG, contact, {"tag": "x"})
        for _ in range(20):  # a steady trickle of entries that match nothing
            await world.send(TAG, contact, {"tag": "nothing"})
            await asyncio.sleep(0.25)
        assert len(await world.announced()) == 1
        assert await world.db.fetchval("SELECT count(*) FROM goalstream_outbox") == 0
    finally:
        worker.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
