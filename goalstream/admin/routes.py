"""The routes of CONTRACT 5: goals of a workflow (create, list, read, change, delete) and stats.

Every query runs in `tenant_transaction`, so another tenant's workflow or goal is simply not
there: 404, never 403.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody

from goalstream.admin.auth import tenant_of
from goalstream.admin.context import AdminContext, admin_context
from goalstream.admin.db import tenant_transaction
from goalstream.admin.schemas import (
    ErrorBody,
    GoalCreate,
    GoalList,
    GoalOut,
    GoalPatch,
    WorkflowStats,
)
from goalstream.admin.stats import compute_stats
from goalstream.goals import GoalMode, GoalType, criteria_json, parse_criteria

# Handler parameters filled by the controller's dependencies.
Ctx = NamedDependency[AdminContext]
Tenant = NamedDependency[uuid.UUID]
PathId = FromPath[uuid.UUID]

_COLUMNS = (
    "id, workflow_id, tenant_id, goal_type::text AS goal_type, criteria::text AS criteria,"
    " is_active, mode, conversion_window_seconds, created_at, updated_at"
)
_WORKFLOW_EXISTS = "SELECT EXISTS (SELECT 1 FROM workflows WHERE id = $1)"
_INSERT = (
    "INSERT INTO workflow_goals (tenant_id, workflow_id, goal_type, criteria, is_active, mode,"
    " conversion_window_seconds) VALUES ($1, $2, $3::goal_type, $4::jsonb, $5, $6, $7)"
    f" RETURNING {_COLUMNS}"
)
_LIST = (
    f"SELECT {_COLUMNS} FROM workflow_goals WHERE workflow_id = $1 AND deleted_at IS NULL"
    " ORDER BY created_at, id"
)
_ONE = (
    f"SELECT {_COLUMNS} FROM workflow_goals"
    " WHERE id = $1 AND workflow_id = $2 AND deleted_at IS NULL"
)
_UPDATE = (
    "UPDATE workflow_goals SET goal_type = $3::goal_type, criteria = $4::jsonb, is_active = $5,"
    " mode = $6, conversion_window_seconds = $7"
    " WHERE id = $1 AND workflow_id = $2 AND deleted_at IS NULL"
    f" RETURNING {_COLUMNS}"
)
_DELETE = (
    "UPDATE workflow_goals SET deleted_at = now()"
    " WHERE id = $1 AND workflow_id = $2 AND deleted_at IS NULL RETURNING id"
)

_ERRORS = {
    401: ResponseSpec(ErrorBody, description="No valid API key."),
    404: ResponseSpec(ErrorBody, description="No such workflow or goal for this key's tenant."),
}
_BODY_ERRORS = {
    **_ERRORS,
    409: ResponseSpec(ErrorBody, description="A goal with this type and criteria exists."),
}
_STATS_ERRORS = {
    **_ERRORS,
    429: ResponseSpec(ErrorBody, description="Rate limit hit; see Retry-After."),
}

_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_NAMED_FIELD = re.compile(r"(?:unknown|required) field `([^`]+)`")


def invalid(field: str, message: str) -> ValidationException:
    """A 400 answer naming the offending field."""
    return ValidationException(
        detail=message,
        extra=[{"key": field, "message": message, "source": "body"}],
    )


def field_in(message: str) -> str | None:
    """The field a msgspec validation message names (`$.a.b` or "... field `a`"), if any."""
    for pattern in (_AT_PATH, _NAMED_FIELD):
        found = pattern.search(message)
        if found and found.group(1):
            return found.group(1)
    return None


def _criteria_field(message: str) -> str:
    """`criteria.<key>` when the validation message names a key, else `criteria`."""
    field = field_in(message)
    return "criteria" if field is None else f"criteria.{field}"


def _has_nul(criteria: Any) -> bool:
    # PostgreSQL text and jsonb cannot hold U+0000: refuse it as bad input, not a server error.
    # Valid criteria are flat, and anything nested fails validation before it is stored, so
    # the top level is all there is to check (and no recursion on a hostile body).
    if not isinstance(criteria, dict):
        return False
    return any("\x00" in k or (isinstance(v, str) and "\x00" in v) for k, v in criteria.items())


def validated_criteria(goal_type: GoalType, criteria: Any) -> str:
    """The canonical criteria JSON, or a 400 naming the criterion at fault."""
    if _has_nul(criteria):
        raise invalid("criteria", "must not contain NUL characters")
    try:
        return criteria_json(parse_criteria(goal_type, criteria))
    except ValueError as exc:
        message = str(exc)
        raise invalid(_criteria_field(message), message) from None


def goal_out(row: asyncpg.Record) -> GoalOut:
    """A goal row as the API answers it."""
    return GoalOut(
        id=row["id"],
        workflow_id=row["workflow_id"],
        tenant_id=row["tenant_id"],
        goal_type=GoalType(row["goal_type"]),
        criteria=msgspec.json.decode(row["criteria"]),
        is_active=row["is_active"],
        mode=GoalMode(row["mode"]),
        conversion_window_seconds=row["conversion_window_seconds"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _conflict() -> HTTPException:
    return HTTPException(
        status_code=409,
        detail="criteria: this workflow already has a goal of this type with these criteria",
        extra=[{"key": "criteria", "message": "duplicate goal", "source": "body"}],
    )


async def _require_workflow(conn: asyncpg.Connection, workflow_id: uuid.UUID) -> None:
    if not await conn.fetchval(_WORKFLOW_EXISTS, workflow_id):
        raise NotFoundException(detail="workflow not found")


def _goal_not_found() -> NotFoundException:
    return NotFoundException(detail="goal not found")


class GoalController(Controller):
    """Goals of one workflow, as seen by the key's tenant."""

    path = "/api/v1/workflows/{workflow_id:uuid}/goals"
    tags = ["goals"]
    security = [{"bearer": []}]
    dependencies = {
        "ctx": Provide(admin_context, sync_to_thread=False),
        "tenant_id": Provide(tenant_of, sync_to_thread=False),
    }

    @post("/", status_code=201, responses=_BODY_ERRORS, summary="Create a goal")
    async def create_goal(
        self, ctx: Ctx, tenant_id: Tenant, workflow_id: PathId, data: JSONBody[GoalCreate]
    ) -> GoalOut:
        criteria = validated_criteria(data.goal_type, data.criteria)
        try:
            async with tenant_transaction(ctx.pool, tenant_id) as conn:
                await _require_workflow(conn, workflow_id)
                row = await conn.fetchrow(
                    _INSERT,
                    tenant_id,
                    workflow_id,
                    data.goal_type.value,
                    criteria,
                    data.is_active,
                    data.mode.value,
                    data.conversion_window_seconds,
                )
        except asyncpg.UniqueViolationError:
            raise _conflict() from None
        await ctx.stats_cache.forget(tenant_id, workflow_id)
        return goal_out(row)

    @get("/", responses=_ERRORS, summary="List a workflow's goals")
    async def list_goals(self, ctx: Ctx, tenant_id: Tenant, workflow_id: PathId) -> GoalList:
        async with tenant_transaction(ctx.pool, tenant_id) as conn:
            await _require_workflow(conn, workflow_id)
            rows = await conn.fetch(_LIST, workflow_id)
        return GoalList(items=[goal_out(r) for r in rows])

    @get("/stats", responses=_STATS_ERRORS, summary="Goal statistics of a workflow")
    async def stats(self, ctx: Ctx, tenant_id: Tenant, workflow_id: PathId) -> WorkflowStats:
        retry_after = await ctx.limiter.hit(tenant_id)
        if retry_after is not None:
            raise HTTPException(
                status_code=429,
                detail="stats rate limit reached; retry later",
                headers={"Retry-After": str(retry_after)},
            )
        cached = await ctx.stats_cache.get(tenant_id, workflow_id)
        if cached is not None:
            return msgspec.json.decode(cached, type=WorkflowStats)
        async with tenant_transaction(ctx.pool, tenant_id) as conn:
            await _require_workflow(conn, workflow_id)
            stats = await compute_stats(conn, workflow_id)
        await ctx.stats_cache.put(tenant_id, workflow_id, stats)
        return stats

    @get("/{goal_id:uuid}", responses=_ERRORS, summary="Read a goal")
    async def read_goal(
        self, ctx: Ctx, tenant_id: Tenant, workflow_id: PathId, goal_id: PathId
    ) -> GoalOut:
        async with tenant_transaction(ctx.pool, tenant_id) as conn:
            row = await conn.fetchrow(_ONE, goal_id, workflow_id)
        if row is None:
            raise _goal_not_found()
        return goal_out(row)

    @patch("/{goal_id:uuid}", responses=_BODY_ERRORS, summary="Change a goal")
    async def change_goal(
        self,
        ctx: Ctx,
        tenant_id: Tenant,
        workflow_id: PathId,
        goal_id: PathId,
        data: JSONBody[GoalPatch],
    ) -> GoalOut:
        try:
            async with tenant_transaction(ctx.pool, tenant_id) as conn:
                current = await conn.fetchrow(_ONE + " FOR UPDATE", goal_id, workflow_id)
                if current is None:
                    raise _goal_not_found()
                row = await conn.fetchrow(_UPDATE, goal_id, workflow_id, *_patched(current, data))
        except asyncpg.UniqueViolationError:
            raise _conflict() from None
        await ctx.stats_cache.forget(tenant_id, workflow_id)
        return goal_out(row)

    @delete("/{goal_id:uuid}", status_code=204, responses=_ERRORS, summary="Delete a goal")
    async def delete_goal(
        self, ctx: Ctx, tenant_id: Tenant, workflow_id: PathId, goal_id: PathId
    ) -> None:
        async with tenant_transaction(ctx.pool, tenant_id) as conn:
            deleted = await conn.fetchval(_DELETE, goal_id, workflow_id)
        if deleted is None:
            raise _goal_not_found()
        await ctx.stats_cache.forget(tenant_id, workflow_id)


def _patched(current: asyncpg.Record, data: GoalPatch) -> tuple[Any, ...]:
    """The goal's new (goal_type, criteria, is_active, mode, window), checked as on create."""
    goal_type = GoalType(current["goal_type"])
    if data.goal_type is not msgspec.UNSET:
        goal_type = data.goal_type
    criteria: str = current["criteria"]
    if data.goal_type is not msgspec.UNSET or data.criteria is not msgspec.UNSET:
        raw = msgspec.json.decode(criteria) if data.criteria is msgspec.UNSET else data.criteria
        criteria = validated_criteria(goal_type, raw)
    is_active = current["is_active"] if data.is_active is msgspec.UNSET else data.is_active
    mode = current["mode"] if data.mode is msgspec.UNSET else data.mode.value
    window = current["conversion_window_seconds"]
    if data.conversion_window_seconds is not msgspec.UNSET:
        window = data.conversion_window_seconds
    return goal_type.value, criteria, is_active, mode, window
