"""The goal cache of a running worker follows changes in the database within 2 seconds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from goalstream.worker import Worker
from tests.conftest import World

pytestmark = pytest.mark.e2e


@pytest.fixture
async def running(world: World) -> AsyncIterator[Worker]:
    """A worker consuming this test's streams in the background."""
    worker = Worker(world.settings)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 10
    while not worker.ready:
        assert time.monotonic() < deadline, "worker did not start"
        assert not task.done(), task
        await asyncio.sleep(0.02)
    yield worker
    worker.stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


async def eventually(check: Callable[[], bool], seconds: float = 2.0) -> float:
    """Wait until `check()` holds, failing after `seconds` (the contract's bound)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            pytest.fail(f"not within {seconds} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_goal_added_changed_deactivated_reach_running_worker(
    world: World, running: Worker
) -> None:
    """A goal inserted, changed, deactivated and deleted is seen by a running worker in 2 s."""
    wf = await world.workflow()
    goal = await world.goal(wf, "tag_added", {"tag": "a"})
    await eventually(lambda: goal in running.cache.index)

    await world.db.execute(
        'UPDATE workflow_goals SET criteria = \'{"tag": "b"}\' WHERE id = $1', goal
    )
    await eventually(
        lambda: (
            getattr(running.cache.index.get(goal), "criteria", None) is not None
            and running.cache.index.get(goal).criteria.tag == "b"
        )  # type: ignore[union-attr]
    )

    await world.db.execute("UPDATE workflow_goals SET is_active = false WHERE id = $1", goal)
    await eventually(lambda: goal not in running.cache.index)

    await world.db.execute("UPDATE workflow_goals SET is_active = true WHERE id = $1", goal)
    await eventually(lambda: goal in running.cache.index)

    await world.db.execute("UPDATE workflows SET is_active = false WHERE id = $1", wf)
    await eventually(lambda: goal not in running.cache.index)
    await world.db.execute("UPDATE workflows SET is_active = true WHERE id = $1", wf)
    await eventually(lambda: goal in running.cache.index)

    await world.db.execute("UPDATE workflow_goals SET deleted_at = now() WHERE id = $1", goal)
    await eventually(lambda: goal not in running.cache.index)
    assert running.metrics.listeners_active._value.get() == 0


async def test_new_goal_is_used_for_the_next_events(world: World, running: Worker) -> None:
    """An event sent after a goal is created (and cached) is matched by the running worker."""
    wf = await world.workflow()
    contact = await world.contact()
    await world.enroll(wf, contact)
    goal = await world.goal(wf, "form_submitted", {"form_id": "f"})
    await eventually(lambda: goal in running.cache.index)
    await world.send("form.submitted", contact, {"form_id": "f"})
    rows: list[object] = []

    async def poll() -> None:
        while not rows:
            rows.extend(await world.achievements())
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), 10)
    assert len(rows) == 1


async def test_full_reload_after_lost_listener_connection(world: World, running: Worker) -> None:
    """If the LISTEN connection dies, the cache reconnects and reloads what it missed."""
    wf = await world.workflow()
    killed = await world.db.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'goalstream-cache'"
    )
    assert killed == 1
    goal = await world.goal(wf, "tag_added", {"tag": "late"})
    await eventually(lambda: goal in running.cache.index, seconds=5)
