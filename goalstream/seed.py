"""Helpers that create platform rows (tenants, workflows, contacts, enrolments, goals).

Used by the tests, the benchmark and the local demo, so that all three build data one way.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from goalstream.goals import GoalMode, GoalType, criteria_json, parse_criteria, parse_goal_type

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool


async def tenant(conn: Conn, name: str = "tenant") -> uuid.UUID:
    """Create a tenant."""
    return await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", name)  # type: ignore[no-any-return]


async def workflow(
    conn: Conn, tenant_id: uuid.UUID, name: str = "workflow", *, is_active: bool = True
) -> uuid.UUID:
    """Create a workflow of a tenant."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO workflows (tenant_id, name, is_active) VALUES ($1, $2, $3) RETURNING id",
        tenant_id,
        name,
        is_active,
    )


async def contact(conn: Conn, tenant_id: uuid.UUID) -> uuid.UUID:
    """Create a contact of a tenant."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO contacts (tenant_id) VALUES ($1) RETURNING id", tenant_id
    )


async def enrollment(
    conn: Conn,
    tenant_id: uuid.UUID,
    workflow_id: uuid.UUID,
    contact_id: uuid.UUID,
    *,
    enrolled_at: datetime | None = None,
    status: str = "active",
    pending_actions: int = 0,
    waits: int = 0,
) -> uuid.UUID:
    """Enrol a contact in a workflow, with pending actions and wait steps."""
    enrollment_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO workflow_enrollments (tenant_id, workflow_id, contact_id, status, enrolled_at)"
        " VALUES ($1, $2, $3, $4, COALESCE($5, now())) RETURNING id",
        tenant_id,
        workflow_id,
        contact_id,
        status,
        enrolled_at,
    )
    kinds = ["action"] * pending_actions + ["wait"] * waits
    if kinds:
        await conn.execute(
            "INSERT INTO workflow_pending_actions (tenant_id, enrollment_id, kind, run_at)"
            " SELECT $1, $2, k, now() + interval '1 day' FROM unnest($3::text[]) AS k",
            tenant_id,
            enrollment_id,
            kinds,
        )
    return enrollment_id


async def goal(
    conn: Conn,
    tenant_id: uuid.UUID,
    workflow_id: uuid.UUID,
    goal_type: GoalType | str,
    criteria: dict[str, Any],
    *,
    mode: GoalMode | str = GoalMode.EXIT,
    is_active: bool = True,
    conversion_window_seconds: int | None = None,
) -> uuid.UUID:
    """Create a goal, validating its criteria as the admin API does."""
    kind = parse_goal_type(goal_type)
    canonical = criteria_json(parse_criteria(kind, criteria))
    return await conn.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO workflow_goals (tenant_id, workflow_id, goal_type, criteria, mode, is_active,"
        " conversion_window_seconds) VALUES ($1, $2, $3::goal_type, $4::jsonb, $5, $6, $7)"
        " RETURNING id",
        tenant_id,
        workflow_id,
        kind.value,
        canonical,
        str(GoalMode(mode).value),
        is_active,
        conversion_window_seconds,
    )


async def contacts(conn: Conn, tenant_id: uuid.UUID, n: int) -> Sequence[uuid.UUID]:
    """Create n contacts of a tenant at once."""
    rows = await conn.fetch(
        "INSERT INTO contacts (tenant_id) SELECT $1 FROM generate_series(1, $2) RETURNING id",
        tenant_id,
        n,
    )
    return [r["id"] for r in rows]
