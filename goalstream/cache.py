"""The in-process cache of active goals, kept current by PostgreSQL notifications.

It loads every active goal at start, then listens on `goalstream_goals`: a notification names a
goal or a workflow, and only those goals are reloaded (so a change reaches the worker in well
under a second, even with a million goals). A full reload on a timer, and after the listening
connection is lost, is the safety net for a missed notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import Iterable

import asyncpg
import msgspec
import structlog

from goalstream import constants
from goalstream.evaluate import GoalIndex
from goalstream.goals import CRITERIA_TYPES, Criteria, Goal, GoalMode, GoalType
from goalstream.metrics import Metrics

log = structlog.get_logger(__name__)

# Live goals: active, not deleted, of an active workflow.
_LOAD = """
SELECT g.id, g.tenant_id, g.workflow_id, g.goal_type::text, g.criteria::text, g.mode,
       g.conversion_window_seconds
FROM workflow_goals g JOIN workflows w ON w.id = g.workflow_id AND w.tenant_id = g.tenant_id
WHERE g.is_active AND g.deleted_at IS NULL AND w.is_active
"""
_LOAD_SOME = _LOAD + " AND (g.id = ANY($1::uuid[]) OR g.workflow_id = ANY($2::uuid[]))"

# Past this many changed goals or workflows at once, a full reload is cheaper.
_PARTIAL_LIMIT = 5000
# How often an idle LISTEN connection is checked for life.
_KEEPALIVE_SECONDS = 10.0
# Notifications arriving this close together are handled as one reload.
_COALESCE_SECONDS = 0.05

_DECODERS = {t: msgspec.json.Decoder(c) for t, c in CRITERIA_TYPES.items()}


def goals_from_rows(rows: Iterable[asyncpg.Record]) -> tuple[list[Goal], int]:
    """Goals from `_LOAD` rows; rows whose criteria no longer validate are counted, not kept."""
    goals: list[Goal] = []
    bad = 0
    for gid, tenant, workflow, goal_type_name, criteria_json, mode, window in rows:
        goal_type = GoalType(goal_type_name)
        try:
            criteria: Criteria = _DECODERS[goal_type].decode(criteria_json)
        except msgspec.ValidationError as exc:
            bad += 1
            log.warning("goal skipped: invalid criteria", goal_id=str(gid), error=str(exc))
            continue
        goals.append(
            Goal(
                id=gid,
                tenant_id=tenant,
                workflow_id=workflow,
                goal_type=goal_type,
                criteria=criteria,
                mode=GoalMode(mode),
                conversion_window_seconds=window,
            )
        )
    return goals, bad


# Rows fetched per round trip on a full load: all of a million goals' rows at once would stay
# in the process's memory after they are freed (pymalloc keeps its arenas).
_LOAD_PAGE = 20_000


async def fetch_goals(conn: asyncpg.Connection) -> tuple[list[Goal], int]:
    """Every live goal, read page by page through a cursor, with the cyclic GC paused.

    A million goals are ten million objects: left on, the collector would walk them a dozen
    times during the load and then, once, for seconds in the middle of serving events.
    """
    goals: list[Goal] = []
    bad = 0
    gc.disable()
    try:
        async with conn.transaction(readonly=True):
            cursor = await conn.cursor(_LOAD)
            while rows := await cursor.fetch(_LOAD_PAGE):
                page, skipped = goals_from_rows(rows)
                goals += page
                bad += skipped
    finally:
        gc.enable()
    return goals, bad


def freeze_index() -> None:
    """Move everything alive now out of the collector's sight: the index has no cycles, so
    the objects of a replaced index are still freed, by reference counting."""
    gc.freeze()


async def load_index(
    conn: asyncpg.Connection,
    *,
    tenant: uuid.UUID | None = None,
    workflow: uuid.UUID | None = None,
) -> GoalIndex:
    """Every live goal, indexed; optionally only a tenant's or a workflow's."""
    goals, _ = await fetch_goals(conn)
    return GoalIndex(
        g
        for g in goals
        if (tenant is None or g.tenant_id == tenant)
        and (workflow is None or g.workflow_id == workflow)
    )


class GoalCache:
    """Holds `index`, the live goals, and keeps it current until `close()`."""

    def __init__(self, dsn: str, metrics: Metrics, *, refresh_seconds: float = 60.0) -> None:
        self._dsn = dsn
        self._metrics = metrics
        self._refresh_seconds = refresh_seconds
        self.index = GoalIndex()
        self._changed_goals: set[uuid.UUID] = set()
        self._changed_workflows: set[uuid.UUID] = set()
        self._need_full = False
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_load_seconds = 0.0

    async def start(self) -> None:
        """Connect, listen, and load every goal before returning."""
        if self._conn is not None:  # a retried start: do not leak the first connection
            self._conn.terminate()
        await self._connect()
        await self.reload_all()
        self._task = asyncio.create_task(self._run(), name="goal-cache")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None and not self._conn.is_closed():
            try:
                await asyncio.wait_for(self._conn.close(), 3)
            except TimeoutError:
                self._conn.terminate()

    async def _connect(self) -> None:
        self._conn = await asyncpg.connect(
            self._dsn,
            timeout=10,
            command_timeout=120,  # a full load of a million goals takes seconds, not minutes
            server_settings={"application_name": "goalstream-cache"},
        )
        await self._conn.add_listener(constants.GOALS_CHANNEL, self._on_notify)
        self._conn.add_termination_listener(self._on_lost)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        kind, _, raw_id = payload.partition(":")
        try:
            changed = uuid.UUID(raw_id)
        except ValueError:
            self._need_full = True
        else:
            target = self._changed_goals if kind == "goal" else self._changed_workflows
            target.add(changed)
        self._wake.set()

    def _on_lost(self, _conn: object) -> None:
        self._wake.set()

    async def _run(self) -> None:
        backoff = 0.5
        next_full = time.monotonic() + self._refresh_seconds
        while True:
            timeout = max(0.0, min(next_full - time.monotonic(), _KEEPALIVE_SECONDS))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            await asyncio.sleep(_COALESCE_SECONDS)
            notified = self._wake.is_set()
            self._wake.clear()
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._connect()
                    self._need_full = True
                assert self._conn is not None
                if time.monotonic() >= next_full:
                    self._need_full = True  # the safety net for a missed notification
                if self._need_full or notified:
                    await self._apply_changes()
                else:
                    # A LISTEN connection that died silently would never say so: ask it.
                    await self._conn.fetchval("SELECT 1", timeout=_KEEPALIVE_SECONDS)
                if self._need_full is False and time.monotonic() >= next_full:
                    next_full = time.monotonic() + self._refresh_seconds
                backoff = 0.5
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._metrics.cache_loads.labels("partial", "error").inc()
                log.warning("goal cache refresh failed; retrying", error=repr(exc), backoff=backoff)
                self._need_full = True
                if self._conn is not None:
                    self._conn.terminate()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._wake.set()

    async def _apply_changes(self) -> None:
        goals, workflows = self._changed_goals, self._changed_workflows
        self._changed_goals, self._changed_workflows = set(), set()
        if self._need_full or len(goals) + len(workflows) > _PARTIAL_LIMIT:
            await self.reload_all()
        elif goals or workflows:
            await self.reload_some(goals, workflows)

    async def reload_all(self) -> None:
        """Replace the index with a fresh load of every live goal."""
        started = time.perf_counter()
        assert self._conn is not None
        self._need_full = False
        try:
            goals, bad = await fetch_goals(self._conn)
        except Exception:
            self._need_full = True
            raise
        gc.disable()
        try:
            self.index = GoalIndex(goals)
        finally:
            gc.enable()
        del goals
        freeze_index()
        self.last_load_seconds = time.perf_counter() - started
        self._metrics.cache_loads.labels("full", "ok").inc()
        self._metrics.cache_load_seconds.labels("full").observe(self.last_load_seconds)
        self._metrics.listeners_active.set(len(self.index))
        log.info(
            "goal cache loaded",
            goals=len(self.index),
            invalid=bad,
            seconds=round(self.last_load_seconds, 3),
        )

    async def reload_some(
        self, goal_ids: Iterable[uuid.UUID], workflow_ids: Iterable[uuid.UUID]
    ) -> None:
        """Reload the named goals and every goal of the named workflows."""
        started = time.perf_counter()
        goal_ids, workflow_ids = list(goal_ids), list(workflow_ids)
        assert self._conn is not None
        rows = await self._conn.fetch(_LOAD_SOME, goal_ids, workflow_ids)
        goals, _ = goals_from_rows(rows)
        index = self.index
        for goal_id in goal_ids:
            index.discard(goal_id)
        for workflow_id in workflow_ids:
            for goal_id in index.goals_of_workflow(workflow_id):
                index.discard(goal_id)
        for goal in goals:
            index.put(goal)
        elapsed = time.perf_counter() - started
        self._metrics.cache_loads.labels("partial", "ok").inc()
        self._metrics.cache_load_seconds.labels("partial").observe(elapsed)
        self._metrics.listeners_active.set(len(index))
        log.debug("goal cache updated", goals=len(goal_ids), workflows=len(workflow_ids))
