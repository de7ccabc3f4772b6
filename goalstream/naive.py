"""The SPEC's design (`GoalEventSubscriber.handle_event`), kept only as the benchmark's baseline.

Per event: query the contact's active enrolments; per enrolment, query its workflow's goals; per
goal, evaluate and, on a match, write the achievement (and the exit) in a transaction of its
own; then acknowledge the event. It reuses goalstream's decoder and criteria matching, prepared
statements and one connection per process, so the ratio measures the design, not a strawman.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import msgspec
import redis.asyncio as aioredis

from goalstream.events import Decoded, Entry, EventDecoder
from goalstream.goals import CRITERIA_TYPES, EVENT_TYPE_OF, Criteria, GoalType
from goalstream.settings import Settings

# Step 4 of the SPEC's pipeline: the contact's active enrolments.
ACTIVE_ENROLLMENTS = """
SELECT id, workflow_id, enrolled_at FROM workflow_enrollments
WHERE contact_id = $1 AND tenant_id = $2 AND status = 'active'
"""
# Step 5: the live goals of one workflow (`goal_service.get_workflow_goals`).
WORKFLOW_GOALS = """
SELECT g.id, g.goal_type::text, g.criteria::text, g.mode, g.conversion_window_seconds
FROM workflow_goals g JOIN workflows w ON w.id = g.workflow_id AND w.tenant_id = g.tenant_id
WHERE g.workflow_id = $1 AND g.tenant_id = $2 AND g.is_active AND g.deleted_at IS NULL
  AND w.is_active
"""
# Step 7 (`exit_service.exit_on_goal`): exit first, so only one event can exit an enrolment.
EXIT_ENROLLMENT = """
UPDATE workflow_enrollments SET status = 'exited', exit_reason = 'goal_achieved', exited_at = now()
WHERE id = $1 AND status = 'active' RETURNING id
"""
INSERT_ACHIEVEMENT = """
INSERT INTO workflow_goal_achievements
    (workflow_id, workflow_enrollment_id, contact_id, goal_config_id, tenant_id, goal_type,
     achieved_at, trigger_event, metadata)
VALUES ($1, $2, $3, $4, $5, $6::goal_type, $7, $8::jsonb,
        jsonb_build_object('mode', $9::text, 'event_id', $10::text, 'stream', $11::text,
                           'entry_id', $12::text, 'recorded_at', now()))
ON CONFLICT (workflow_enrollment_id, goal_config_id) DO NOTHING
RETURNING id
"""
CANCEL_ACTIONS = """
UPDATE workflow_pending_actions
   SET status = 'cancelled', cancel_reason = 'goal_achieved', cancelled_at = now()
 WHERE enrollment_id = $1 AND status = 'pending'
"""

_DECODERS = {t: msgspec.json.Decoder(c) for t, c in CRITERIA_TYPES.items()}


class NaiveSubscriber:
    """One process of the SPEC's subscriber, reading the same consumer group as a worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.decoder = EventDecoder()
        self.redis: aioredis.Redis = aioredis.Redis.from_url(settings.redis_url)
        self.conn: asyncpg.Connection | None = None
        self.achievements = 0

    async def start(self) -> None:
        """Open the one database connection."""
        self.conn = await asyncpg.connect(self.settings.database_url)

    async def close(self) -> None:
        """Close both connections."""
        if self.conn is not None:
            await self.conn.close()
        await self.redis.aclose()

    async def handle_entry(self, entry: Entry) -> None:
        """Decode one entry, handle its event, then acknowledge it on its own."""
        decoded = self.decoder.decode(entry)
        if isinstance(decoded, Decoded):
            await self.handle_event(decoded)
        await self.redis.xack(entry.stream, self.settings.group, entry.entry_id)

    async def handle_event(self, decoded: Decoded) -> None:
        """The SPEC's `handle_event`: enrolments, then goals per enrolment, then exits."""
        assert self.conn is not None
        event = decoded.event
        enrollments = await self.conn.fetch(ACTIVE_ENROLLMENTS, event.contact_id, event.tenant_id)
        for enrollment_id, workflow_id, enrolled_at in enrollments:
            if decoded.occurred_at < enrolled_at:
                continue
            goals = await self.conn.fetch(WORKFLOW_GOALS, workflow_id, event.tenant_id)
            for goal_id, goal_type_name, criteria_text, mode, window in goals:
                goal_type = GoalType(goal_type_name)
                if EVENT_TYPE_OF[goal_type] != event.type_name:
                    continue
                if not _in_window(decoded.occurred_at, enrolled_at, window):
                    continue
                criteria: Criteria = _DECODERS[goal_type].decode(criteria_text)
                if not criteria.matches(event.data):  # type: ignore[arg-type]
                    continue
                exited = await self.exit_on_goal(
                    decoded, enrollment_id, workflow_id, goal_id, goal_type_name, mode
                )
                if exited:
                    break

    async def exit_on_goal(
        self,
        decoded: Decoded,
        enrollment_id: object,
        workflow_id: object,
        goal_id: object,
        goal_type: str,
        mode: str,
    ) -> bool:
        """Record one achievement (and exit for an exit goal); True if the enrolment exited."""
        assert self.conn is not None
        event = decoded.event
        async with self.conn.transaction():
            if mode == "exit" and await self.conn.fetchval(EXIT_ENROLLMENT, enrollment_id) is None:
                return False  # another event exited it first
            achievement_id = await self.conn.fetchval(
                INSERT_ACHIEVEMENT,
                workflow_id,
                enrollment_id,
                event.contact_id,
                goal_id,
                event.tenant_id,
                goal_type,
                decoded.occurred_at,
                (decoded.entry.data or b"{}").decode(),
                mode,
                event.id,
                decoded.entry.stream,
                decoded.entry.entry_id,
            )
            if mode == "exit":
                await self.conn.execute(CANCEL_ACTIONS, enrollment_id)
        if achievement_id is not None:
            self.achievements += 1
            announcement = {
                "id": str(achievement_id),
                "type": "workflow.goal.achieved",
                "goal_id": str(goal_id),
                "enrollment_id": str(enrollment_id),
            }
            await self.redis.xadd(
                self.settings.achieved_stream, {"data": msgspec.json.encode(announcement)}
            )
        return mode == "exit"


def _in_window(occurred: datetime, enrolled_at: datetime, window: int | None) -> bool:
    return window is None or occurred <= enrolled_at + timedelta(seconds=window)
