"""The write side: one set-based PostgreSQL statement per batch, atomic by itself.

Given the (event, goal) matches of a batch, the statement finds each match's eligible
enrolments, exits enrolments for `exit` goals (only those still active, the first event in
batch order winning), cancels their pending actions and wait steps, inserts achievements
`ON CONFLICT DO NOTHING`, and writes one outbox row per new achievement, which is announced
after the commit. Processing the same batch twice writes nothing the second time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec

from goalstream.events import Decoded
from goalstream.goals import Goal

# One statement, so one round trip and one implicit transaction. The CTEs run once each, and
# the data-modifying ones see the same snapshot: `exited` decides which exits happen (its
# UPDATE re-checks `status = 'active'` under row locks, so two workers cannot both exit one
# enrolment) and everything after it keys off what `exited` returned.
COMMIT_BATCH = """
WITH ev AS (
    SELECT * FROM unnest($1::int[], $2::uuid[], $3::uuid[], $4::timestamptz[], $5::text[],
                         $6::text[], $7::text[], $8::text[])
        AS ev(ord, tenant_id, contact_id, occurred_at, event_id, trigger_event, stream, entry_id)
), cand AS (
    SELECT * FROM unnest($9::int[], $10::uuid[], $12::uuid[]) AS cand(ord, goal_id, workflow_id)
), enrolled AS MATERIALIZED (
    -- Driven by the batch's events: each event's contact has few active enrolments, found by
    -- the partial index on contact_id. The LATERAL subquery (kept apart by OFFSET 0) pins
    -- that plan: one index probe per event, whatever the planner guesses about the arrays
    -- or however many goals an event matched across the tenant's workflows.
    SELECT ev.ord, e.id, e.workflow_id, e.enrolled_at, ev.tenant_id, ev.contact_id,
           ev.occurred_at, ev.event_id, ev.trigger_event, ev.stream, ev.entry_id
    FROM ev CROSS JOIN LATERAL (
        SELECT e.id, e.workflow_id, e.enrolled_at FROM workflow_enrollments e
        WHERE e.contact_id = ev.contact_id AND e.status = 'active'
          AND e.tenant_id = ev.tenant_id AND e.enrolled_at <= ev.occurred_at
        OFFSET 0
    ) e
), matched AS MATERIALIZED (
    SELECT e.ord, g.id AS goal_id, g.goal_type, g.mode, e.workflow_id, e.id AS enrollment_id,
           e.tenant_id, e.contact_id, e.occurred_at, e.event_id, e.trigger_event,
           e.stream, e.entry_id
    FROM enrolled e
    JOIN cand ON cand.ord = e.ord AND cand.workflow_id = e.workflow_id
    CROSS JOIN LATERAL (  -- by primary key, re-checked: the cache may be a moment behind
        SELECT g.* FROM workflow_goals g WHERE g.id = cand.goal_id OFFSET 0
    ) g
    CROSS JOIN LATERAL (
        SELECT w.* FROM workflows w WHERE w.id = e.workflow_id OFFSET 0
    ) w
    WHERE g.workflow_id = e.workflow_id AND g.tenant_id = e.tenant_id
      AND g.is_active AND g.deleted_at IS NULL
      AND w.tenant_id = e.tenant_id AND w.is_active
      AND (g.conversion_window_seconds IS NULL
           OR e.occurred_at <= e.enrolled_at + make_interval(secs => g.conversion_window_seconds))
), ranked AS MATERIALIZED (
    -- An exit needs an achievement to record and announce it: a goal this enrolment already
    -- achieved (as a measure goal, before its mode changed) cannot exit it again.
    SELECT m.*, x.can_exit,
           min(m.ord) FILTER (WHERE x.can_exit) OVER (PARTITION BY m.enrollment_id) AS exit_ord,
           row_number() OVER (PARTITION BY m.enrollment_id, x.can_exit
                              ORDER BY m.ord, m.goal_id) AS rn
    FROM matched m CROSS JOIN LATERAL (
        SELECT m.mode = 'exit' AND NOT EXISTS (
            SELECT 1 FROM workflow_goal_achievements a
            WHERE a.workflow_enrollment_id = m.enrollment_id AND a.goal_config_id = m.goal_id
        ) AS can_exit
    ) x
), first_exit AS (
    SELECT enrollment_id, ord, goal_id FROM ranked WHERE can_exit AND rn = 1
), exited AS (
    UPDATE workflow_enrollments e
       SET status = 'exited', exit_reason = 'goal_achieved', exited_at = now()
      FROM first_exit f
     WHERE e.id = f.enrollment_id AND e.status = 'active'
    RETURNING e.id
), cancelled AS (
    UPDATE workflow_pending_actions p
       SET status = 'cancelled', cancel_reason = 'goal_achieved', cancelled_at = now()
     WHERE p.status = 'pending' AND p.enrollment_id IN (SELECT id FROM exited)
    RETURNING p.enrollment_id
), cancel_counts AS (
    SELECT jsonb_object_agg(enrollment_id, n) AS m
    FROM (SELECT enrollment_id, count(*)::int AS n FROM cancelled GROUP BY enrollment_id) c
), winners AS (
    -- measure goals met up to and including the enrolment's exit event, and the exit itself
    SELECT DISTINCT ON (m.enrollment_id, m.goal_id) m.*
    FROM ranked m
    WHERE (m.mode = 'measure' AND (m.exit_ord IS NULL OR m.ord <= m.exit_ord))
       OR (m.can_exit AND m.rn = 1 AND m.enrollment_id IN (SELECT id FROM exited))
    ORDER BY m.enrollment_id, m.goal_id, m.ord
), inserted AS (
    INSERT INTO workflow_goal_achievements AS a
        (workflow_id, workflow_enrollment_id, contact_id, goal_config_id, tenant_id, goal_type,
         achieved_at, trigger_event, metadata)
    SELECT workflow_id, enrollment_id, contact_id, goal_id, tenant_id, goal_type,
           occurred_at, trigger_event::jsonb,
           jsonb_build_object('mode', mode, 'event_id', event_id, 'stream', stream,
                              'entry_id', entry_id, 'recorded_at', now())
    FROM winners
    ON CONFLICT (workflow_enrollment_id, goal_config_id) DO NOTHING
    RETURNING a.id, a.tenant_id, a.contact_id, a.workflow_id, a.workflow_enrollment_id,
              a.goal_config_id, a.goal_type, a.achieved_at, a.metadata
), outbox AS (
    INSERT INTO goalstream_outbox (achievement_id, payload)
    SELECT i.id, jsonb_build_object(
               'id', i.id, 'type', 'workflow.goal.achieved', 'tenant_id', i.tenant_id,
               'contact_id', i.contact_id, 'workflow_id', i.workflow_id,
               'enrollment_id', i.workflow_enrollment_id, 'goal_id', i.goal_config_id,
               'goal_type', i.goal_type, 'mode', i.metadata->>'mode',
               'achieved_at', i.achieved_at, 'trigger_event_id', i.metadata->>'event_id',
               'cancelled_actions', CASE WHEN i.metadata->>'mode' = 'exit' THEN COALESCE(
                   ((SELECT m FROM cancel_counts) ->> i.workflow_enrollment_id::text)::int, 0)
               ELSE 0 END)::text
    FROM inserted i  -- the exit's announcement carries the count
    RETURNING id, payload
), published AS (
    DELETE FROM goalstream_outbox WHERE id = ANY($11::bigint[])
)
SELECT o.id, o.payload, (SELECT count(*) FROM exited)::int AS exits,
       (SELECT count(*) FROM cancelled)::int AS cancelled
FROM outbox o
UNION ALL
SELECT NULL, NULL, (SELECT count(*) FROM exited)::int, (SELECT count(*) FROM cancelled)::int
"""

DELETE_PUBLISHED = "DELETE FROM goalstream_outbox WHERE id = ANY($1::bigint[])"


class Announcement(msgspec.Struct, frozen=True):
    """An outbox row: an achievement to publish, and the row to delete once it is."""

    outbox_id: int
    payload: str


class CommitResult(msgspec.Struct, frozen=True):
    """What one batch's statement wrote."""

    announcements: list[Announcement]
    exits: int
    cancelled: int


EMPTY = CommitResult([], 0, 0)


class BatchArrays(msgspec.Struct):
    """The statement's parameters: one row per event that has a match, one per match."""

    ords: list[int]
    tenants: list[uuid.UUID]
    contacts: list[uuid.UUID]
    occurred: list[datetime]
    event_ids: list[str]
    triggers: list[str]
    streams: list[str]
    entry_ids: list[str]
    cand_ords: list[int]
    cand_goals: list[uuid.UUID]
    cand_workflows: list[uuid.UUID]


def batch_arrays(events: Sequence[Decoded], matches: Sequence[tuple[int, Goal]]) -> BatchArrays:
    """Lay the matches out as the columns `COMMIT_BATCH` unnests."""
    arrays = BatchArrays([], [], [], [], [], [], [], [], [], [], [])
    seen: set[int] = set()
    for position, goal in matches:
        arrays.cand_ords.append(position)
        arrays.cand_goals.append(goal.id)
        arrays.cand_workflows.append(goal.workflow_id)
        if position in seen:
            continue
        seen.add(position)
        decoded = events[position]
        event = decoded.event
        arrays.ords.append(position)
        arrays.tenants.append(event.tenant_id)
        arrays.contacts.append(event.contact_id)
        arrays.occurred.append(decoded.occurred_at)
        arrays.event_ids.append(event.id)
        arrays.triggers.append((decoded.entry.data or b"{}").decode())
        arrays.streams.append(decoded.entry.stream)
        arrays.entry_ids.append(decoded.entry.entry_id)
    return arrays


async def commit_batch(
    conn: asyncpg.Connection | asyncpg.Pool,
    events: Sequence[Decoded],
    matches: Sequence[tuple[int, Goal]],
    published: Sequence[int] = (),
) -> CommitResult:
    """Write a batch's effects in one statement; also delete outbox rows already published."""
    if not matches:
        if published:
            await conn.execute(DELETE_PUBLISHED, list(published))
        return EMPTY
    a = batch_arrays(events, matches)
    rows = await conn.fetch(
        COMMIT_BATCH,
        a.ords,
        a.tenants,
        a.contacts,
        a.occurred,
        a.event_ids,
        a.triggers,
        a.streams,
        a.entry_ids,
        a.cand_ords,
        a.cand_goals,
        list(published),
        a.cand_workflows,
    )
    announcements = [Announcement(r[0], r[1]) for r in rows if r[0] is not None]
    last = rows[-1]
    return CommitResult(announcements, last[2], last[3])
