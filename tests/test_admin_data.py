"""The admin API's data side: row-level security, stats, the stats cache and limit, workers."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient

from goalstream import constants, seed
from goalstream.admin import create_app
from goalstream.admin.db import create_pool, tenant_transaction
from goalstream.admin.stats import StatsCache, compute_stats
from goalstream.settings import Settings
from goalstream.worker import Worker
from tests.admin_support import Caller, alice, api, bob, eventually
from tests.conftest import World

__all__ = ["alice", "api", "bob"]  # fixtures used below

TENANT_TABLES = (
    "tenants",
    "workflows",
    "contacts",
    "workflow_enrollments",
    "workflow_pending_actions",
    "workflow_goals",
    "workflow_goal_achievements",
)


async def _two_tenants_with_data(world: World) -> tuple[uuid.UUID, uuid.UUID]:
    """Alice (the world's tenant) and Bob, each with a workflow, goal, enrolment, achievement."""
    bob_id = await seed.tenant(world.db, "bob")
    for tenant in (world.tenant_id, bob_id):
        wf = await world.workflow(tenant_id=tenant)
        contact = await world.contact(tenant)
        await world.enroll(wf, contact, tenant_id=tenant, pending_actions=1, waits=1)
        await world.goal(wf, "tag_added", {"tag": "vip"}, tenant_id=tenant, mode="measure")
        await world.send(constants.TAG_ADDED, contact, {"tag": "vip"}, tenant_id=tenant)
    await world.run_worker()
    assert len(await world.achievements()) == 2
    return world.tenant_id, bob_id


async def test_rls_hides_other_tenants_rows_from_unfiltered_queries(world: World) -> None:
    """Through the API's session set-up, unfiltered queries see and change one tenant's rows."""
    alice_id, bob_id = await _two_tenants_with_data(world)
    for table in TENANT_TABLES:  # the owner (the worker's view) sees both: the test is not empty
        column = "id" if table == "tenants" else "tenant_id"
        owner_view = await world.db.fetch(f"SELECT DISTINCT {column} FROM {table}")
        assert {r[0] for r in owner_view} == {alice_id, bob_id}, table
    pool = await create_pool(world.settings.database_url, max_size=2)
    try:
        async with tenant_transaction(pool, alice_id) as conn:
            for table in TENANT_TABLES:
                column = "id" if table == "tenants" else "tenant_id"
                rows = await conn.fetch(f"SELECT DISTINCT {column} FROM {table}")
                assert {r[0] for r in rows} == {alice_id}, table
            changed = await conn.execute("UPDATE workflow_goals SET is_active = false")
            assert changed == "UPDATE 1"
        async with tenant_transaction(pool, alice_id) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # row-level security
                await conn.execute(
                    "INSERT INTO workflow_goals (tenant_id, workflow_id, goal_type, criteria)"
                    " SELECT $1, w.id, 'form_submitted', '{\"form_id\": \"x\"}' FROM workflows w",
                    bob_id,
                )
        async with tenant_transaction(pool, alice_id) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # no grant at all
                await conn.fetch("SELECT * FROM api_keys")
        async with pool.acquire() as conn:  # the pooled connection went back clean
            assert await conn.fetchval("SELECT current_user") == await world.db.fetchval(
                "SELECT current_user"
            )
            assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in (
                None,
                "",
            )
    finally:
        await pool.close()
    active = await world.db.fetch("SELECT tenant_id, is_active FROM workflow_goals")
    assert {(r["tenant_id"], r["is_active"]) for r in active} == {
        (alice_id, False),
        (bob_id, True),
    }


async def test_stats_numbers(alice: Caller, world: World) -> None:
    """Totals, per-goal rates, average and median time to goal, and daily counts, by hand."""
    wf = alice.workflow_id
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    contacts = [await world.contact() for _ in range(5)]
    for contact in contacts:
        await world.enroll(wf, contact, enrolled_at=base)
    f1 = await alice.create(
        {"goal_type": "form_submitted", "criteria": {"form_id": "f1"}, "mode": "measure"}
    )
    f2 = await alice.create(
        {"goal_type": "form_submitted", "criteria": {"form_id": "f2"}, "mode": "measure"}
    )
    appt = await alice.create(
        {"goal_type": "appointment_booked", "criteria": {}, "mode": "measure"}
    )
    vip = await alice.create({"goal_type": "tag_added", "criteria": {"tag": "vip"}})
    unmet = await alice.create({"goal_type": "form_submitted", "criteria": {"form_id": "never"}})
    sends = [
        (0, constants.FORM_SUBMITTED, {"form_id": "f1"}, 60),
        (0, constants.FORM_SUBMITTED, {"form_id": "f2"}, 120),
        (0, constants.APPOINTMENT_BOOKED, {"calendar_id": "c"}, 180),
        (1, constants.TAG_ADDED, {"tag": "VIP"}, 600),
        (2, constants.FORM_SUBMITTED, {"form_id": "f1"}, 300),
        (3, constants.FORM_SUBMITTED, {"form_id": "f1"}, 30_000),
    ]
    for who, event_type, data, after in sends:
        occurred = base + timedelta(seconds=after)
        await world.send(event_type, contacts[who], data, occurred_at=occurred)
    await world.run_worker()

    response = await alice.request("GET", alice.goals_path() + "/stats")
    assert response.status_code == 200
    stats = response.json()
    assert (stats["workflow_id"], stats["enrollments_total"], stats["enrollments_achieved"]) == (
        str(wf),
        5,
        4,
    )
    assert stats["conversion_rate"] == pytest.approx(0.8)
    by_goal = {g["goal_id"]: g for g in stats["goals"]}
    expected = {
        f1["id"]: (3, 0.6, (60 + 300 + 30_000) / 3, 300),
        f2["id"]: (1, 0.2, 120, 120),
        appt["id"]: (1, 0.2, 180, 180),
        vip["id"]: (1, 0.2, 600, 600),
        unmet["id"]: (0, 0.0, None, None),
    }
    assert set(by_goal) == set(expected)
    for goal_id, (count, rate, avg, median) in expected.items():
        got = by_goal[goal_id]
        assert got["achievements"] == count
        assert got["conversion_rate"] == pytest.approx(rate)
        assert got["avg_seconds_to_goal"] == (None if avg is None else pytest.approx(avg))
        assert got["median_seconds_to_goal"] == (None if median is None else pytest.approx(median))
    daily = stats["daily"]
    today = datetime.now(UTC).date()
    assert [d["date"] for d in daily] == [
        (today - timedelta(days=29 - i)).isoformat() for i in range(30)
    ]
    per_day: dict[str, int] = {}
    for _, _, _, after in sends:
        day = (base + timedelta(seconds=after)).date().isoformat()
        per_day[day] = per_day.get(day, 0) + 1
    assert {d["date"]: d["achievements"] for d in daily if d["achievements"]} == per_day


@hsettings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    achieved=st.lists(st.sets(st.integers(0, 3), max_size=4), min_size=0, max_size=6),
)
async def test_conversion_counts_enrollments_not_achievements(
    world: World, achieved: list[set[int]]
) -> None:
    """Whatever measure goals each enrolment meets, conversion = achieving enrolments / all."""
    wf = await world.workflow()  # a workflow of this example's own
    goals = [
        await world.goal(wf, "form_submitted", {"form_id": f"f{i}"}, mode="measure")
        for i in range(4)
    ]
    for met in achieved:
        contact = await world.contact()
        enrollment = await world.enroll(wf, contact)
        for i in met:
            await world.db.execute(
                "INSERT INTO workflow_goal_achievements (workflow_id, workflow_enrollment_id,"
                " contact_id, goal_config_id, tenant_id, goal_type)"
                " VALUES ($1, $2, $3, $4, $5, 'form_submitted')",
                wf,
                enrollment,
                contact,
                goals[i],
                world.tenant_id,
            )
    stats = await compute_stats(world.db, wf)
    total = len(achieved)
    converted = sum(1 for met in achieved if met)
    assert (stats.enrollments_total, stats.enrollments_achieved) == (total, converted)
    assert 0.0 <= stats.conversion_rate <= 1.0
    assert stats.conversion_rate == pytest.approx(converted / total if total else 0.0)
    for goal in stats.goals:
        assert 0.0 <= goal.conversion_rate <= 1.0
        assert goal.achievements == sum(1 for met in achieved if goals.index(goal.goal_id) in met)


async def test_delete_stops_matching_but_keeps_achievements_and_stats(
    alice: Caller, world: World
) -> None:
    """After DELETE a goal matches no new event; its achievement and its stats stay."""
    goal = await alice.create({"goal_type": "tag_added", "criteria": {"tag": "vip"}})
    first, second = await world.contact(), await world.contact()
    await world.enroll(alice.workflow_id, first)
    late = await world.enroll(alice.workflow_id, second)
    await world.send(constants.TAG_ADDED, first, {"tag": "vip"})
    await world.run_worker()
    assert len(await world.achievements()) == 1

    deleted = await alice.request("DELETE", f"{alice.goals_path()}/{goal['id']}")
    assert deleted.status_code == 204
    await world.send(constants.TAG_ADDED, second, {"tag": "vip"})
    await world.run_worker()
    rows = await world.achievements()
    assert [str(r["goal_config_id"]) for r in rows] == [goal["id"]]
    assert (await world.enrollment(late))["status"] == "active"

    stats = (await alice.request("GET", alice.goals_path() + "/stats")).json()
    assert (stats["enrollments_total"], stats["enrollments_achieved"]) == (2, 1)
    assert [(g["goal_id"], g["achievements"], g["deleted"]) for g in stats["goals"]] == [
        (goal["id"], 1, True)
    ]


async def test_stats_are_cached_for_the_ttl_and_dropped_on_goal_change(
    alice: Caller, world: World
) -> None:
    """A second stats call within the TTL is served from Redis; a goal change recomputes."""
    path = alice.goals_path() + "/stats"
    goal = await alice.create({"goal_type": "tag_added", "criteria": {"tag": "vip"}})
    assert (await alice.request("GET", path)).json()["enrollments_total"] == 0
    key = StatsCache.key(alice.tenant_id, alice.workflow_id)
    ttl = await world.redis.ttl(key)
    assert 0 < ttl <= world.settings.stats_cache_ttl_seconds
    await world.enroll(alice.workflow_id, await world.contact())
    assert (await alice.request("GET", path)).json()["enrollments_total"] == 0  # cached
    await alice.request("PATCH", f"{alice.goals_path()}/{goal['id']}", {"is_active": False})
    assert (await alice.request("GET", path)).json()["enrollments_total"] == 1


async def test_stats_rate_limit_is_per_tenant_and_shared_by_processes(
    alice: Caller, bob: Caller, settings: Settings
) -> None:
    """Past the limit, stats answer 429 with Retry-After in every admin app, for that tenant."""
    path = alice.goals_path() + "/stats"
    for _ in range(5):  # the `api` fixture's limit
        assert (await alice.request("GET", path)).status_code == 200
    limited = await alice.request("GET", path)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # Another admin process, its limit from GOALSTREAM_STATS_RATE_LIMIT_PER_MINUTE.
    configured = msgspec.structs.replace(settings, stats_rate_limit_per_minute=5)
    async with AsyncTestClient(create_app(configured)) as other_process:
        again = await other_process.get(path, headers=alice.headers)
        assert again.status_code == 429
    assert (await bob.request("GET", bob.goals_path() + "/stats")).status_code == 200


@pytest.mark.e2e
async def test_goal_changes_reach_a_running_worker_within_2s(alice: Caller, world: World) -> None:
    """Goals created, changed and deleted through the API are in a running worker's cache in 2 s."""
    # A slow timer: only the notifications can make this pass.
    worker = Worker(msgspec.structs.replace(world.settings, cache_refresh_seconds=3600.0))
    task = asyncio.create_task(worker.run())
    try:
        assert await eventually(lambda: worker.ready or task.done(), within=30)
        assert not task.done()
        index = lambda: worker.cache.index  # noqa: E731 (the cache swaps its index on reloads)

        created = await alice.create({"goal_type": "tag_added", "criteria": {"tag": "vip"}})
        goal_id = uuid.UUID(created["id"])
        assert await eventually(lambda: goal_id in index(), within=2.0)

        path = f"{alice.goals_path()}/{goal_id}"
        await alice.request("PATCH", path, {"criteria": {"tag_pattern": "gold*"}})
        assert await eventually(
            lambda: (
                getattr(index().get(goal_id), "criteria", None) is not None
                and index().get(goal_id).criteria.tag_pattern == "gold*"
            ),  # type: ignore[union-attr]
            within=2.0,
        )
        await alice.request("PATCH", path, {"is_active": False})
        assert await eventually(lambda: goal_id not in index(), within=2.0)
        await alice.request("PATCH", path, {"is_active": True})
        assert await eventually(lambda: goal_id in index(), within=2.0)
        assert (await alice.request("DELETE", path)).status_code == 204
        assert await eventually(lambda: goal_id not in index(), within=2.0)
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 30)
