"""Goal statistics of a workflow: computed in PostgreSQL, cached in Redis, rate-limited per tenant.

Time to goal is an achievement's `achieved_at` (its triggering event's time) minus its
enrolment's `enrolled_at`. A conversion counts enrolments, never events or achievements, so a
rate cannot pass 1 however many `measure` goals one enrolment meets.
"""

from __future__ import annotations

import uuid
from datetime import date

import asyncpg
import msgspec
import redis.asyncio as aioredis

from goalstream.admin.schemas import DailyCount, GoalStats, WorkflowStats
from goalstream.goals import GoalType

# Cache and rate-limit keys, per tenant (and workflow): the limit holds across admin processes.
STATS_CACHE_KEY = "goalstream:admin:stats:{tenant}:{workflow}"
RATE_LIMIT_KEY = "goalstream:admin:ratelimit:stats:{tenant}"

# Default stats requests a tenant may make per window (cache hits count too: the limit protects
# the database and Redis alike from a client in a loop).
DEFAULT_RATE_LIMIT = 60
DEFAULT_RATE_WINDOW_SECONDS = 60
DAILY_DAYS = 30

_TOTALS = """
SELECT count(*)::bigint AS total,
       count(*) FILTER (WHERE EXISTS (
           SELECT 1 FROM workflow_goal_achievements a WHERE a.workflow_enrollment_id = e.id
       ))::bigint AS achieved
FROM workflow_enrollments e
WHERE e.workflow_id = $1
"""

# Per goal: live goals, and deleted goals whose achievements are still counted.
_PER_GOAL = """
WITH t AS (
    SELECT a.goal_config_id AS goal_id, a.workflow_enrollment_id AS enrollment_id,
           GREATEST(extract(epoch FROM a.achieved_at - e.enrolled_at), 0)::float8 AS seconds
    FROM workflow_goal_achievements a
    JOIN workflow_enrollments e ON e.id = a.workflow_enrollment_id AND e.workflow_id = $1
    WHERE a.workflow_id = $1
)
SELECT g.id, g.goal_type::text AS goal_type, g.deleted_at IS NOT NULL AS deleted,
       count(t.goal_id)::bigint AS achievements,
       count(DISTINCT t.enrollment_id)::bigint AS enrollments,
       avg(t.seconds) AS avg_seconds,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY t.seconds) AS median_seconds
FROM workflow_goals g
LEFT JOIN t ON t.goal_id = g.id
WHERE g.workflow_id = $1
GROUP BY g.id
HAVING g.deleted_at IS NULL OR count(t.goal_id) > 0
ORDER BY min(g.created_at), g.id
"""

# The last 30 UTC days, today included, with zeros for days without achievements.
_DAILY = """
SELECT d::date AS day, count(a.id)::bigint AS achievements
FROM generate_series((now() AT TIME ZONE 'UTC')::date - ($2::int - 1),
                     (now() AT TIME ZONE 'UTC')::date, interval '1 day') AS d
LEFT JOIN workflow_goal_achievements a
  ON a.workflow_id = $1 AND (a.achieved_at AT TIME ZONE 'UTC')::date = d::date
GROUP BY d
ORDER BY d
"""


def _rate(part: int, whole: int) -> float:
    return 0.0 if whole <= 0 else min(1.0, part / whole)


async def compute_stats(conn: asyncpg.Connection, workflow_id: uuid.UUID) -> WorkflowStats:
    """The stats of one workflow, from the database (callers check the workflow exists)."""
    totals = await conn.fetchrow(_TOTALS, workflow_id)
    total, achieved = int(totals["total"]), int(totals["achieved"])
    goals = [
        GoalStats(
            goal_id=row["id"],
            goal_type=GoalType(row["goal_type"]),
            achievements=int(row["achievements"]),
            conversion_rate=_rate(int(row["enrollments"]), total),
            avg_seconds_to_goal=row["avg_seconds"],
            median_seconds_to_goal=row["median_seconds"],
            deleted=row["deleted"],
        )
        for row in await conn.fetch(_PER_GOAL, workflow_id)
    ]
    daily = [
        DailyCount(date=_iso(row["day"]), achievements=int(row["achievements"]))
        for row in await conn.fetch(_DAILY, workflow_id, DAILY_DAYS)
    ]
    return WorkflowStats(
        workflow_id=workflow_id,
        enrollments_total=total,
        enrollments_achieved=achieved,
        conversion_rate=_rate(achieved, total),
        goals=goals,
        daily=daily,
    )


def _iso(day: date) -> str:
    return day.isoformat()


class StatsCache:
    """Stats JSON in Redis for `ttl` seconds, per tenant and workflow."""

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl = ttl_seconds

    @staticmethod
    def key(tenant_id: uuid.UUID, workflow_id: uuid.UUID) -> str:
        return STATS_CACHE_KEY.format(tenant=tenant_id, workflow=workflow_id)

    async def get(self, tenant_id: uuid.UUID, workflow_id: uuid.UUID) -> bytes | None:
        """The cached stats JSON, if fresh."""
        if self.ttl <= 0:
            return None
        cached = await self.redis.get(self.key(tenant_id, workflow_id))
        return cached if isinstance(cached, bytes) else None

    async def put(
        self, tenant_id: uuid.UUID, workflow_id: uuid.UUID, stats: WorkflowStats
    ) -> bytes:
        """Cache the stats; return their JSON."""
        body = msgspec.json.encode(stats)
        if self.ttl > 0:
            await self.redis.set(self.key(tenant_id, workflow_id), body, ex=self.ttl)
        return body

    async def forget(self, tenant_id: uuid.UUID, workflow_id: uuid.UUID) -> None:
        """Drop a workflow's cached stats (its goals changed)."""
        await self.redis.delete(self.key(tenant_id, workflow_id))


class RateLimiter:
    """A counter per tenant in Redis, shared by every admin process.

    The window opens at a tenant's first request and lasts `window_seconds`; `Retry-After` is
    the time left in it.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        limit: int = DEFAULT_RATE_LIMIT,
        window_seconds: int = DEFAULT_RATE_WINDOW_SECONDS,
    ) -> None:
        self.redis = redis
        self.limit = limit
        self.window = window_seconds

    async def hit(self, tenant_id: uuid.UUID) -> int | None:
        """Count one request; None if allowed, else the seconds until the window resets."""
        key = RATE_LIMIT_KEY.format(tenant=tenant_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=self.window, nx=True)  # opens a window if none is open
            pipe.incr(key)
            pipe.ttl(key)
            _, count, ttl = await pipe.execute()
        if int(count) <= self.limit:
            return None
        return max(1, int(ttl))
