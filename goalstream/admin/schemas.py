"""Request and response bodies of the admin API, as msgspec structs (CONTRACT 5).

The shape of `criteria` depends on `goal_type`, so bodies carry it as an object and the routes
check it with `goals.parse_criteria`: one definition of a valid goal, shared with the worker.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from goalstream.goals import GoalMode, GoalType, WindowSeconds

CRITERIA_DOC = (
    "Depends on goal_type (unknown keys are rejected). tag_added: exactly one of `tag` or "
    "`tag_pattern` (glob with * and ?), case-insensitive. purchase_made: optional `product_id`, "
    "`min_amount` (decimal >= 0), `currency` (3 letters). appointment_booked: optional "
    "`calendar_id`, `service_id`. form_submitted: `form_id`. pipeline_stage_reached: "
    "`pipeline_id` and `stage_id`."
)

CriteriaObject = Annotated[
    dict[str, Any],
    msgspec.Meta(description=CRITERIA_DOC, examples=[{"tag": "vip"}, {"form_id": "contact-us"}]),
]


class GoalCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST body: a new goal of a workflow."""

    goal_type: GoalType
    criteria: CriteriaObject
    is_active: bool = True
    mode: GoalMode = GoalMode.EXIT
    conversion_window_seconds: WindowSeconds | None = None


class GoalPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """PATCH body: any of the goal's fields; a field left out keeps its value."""

    goal_type: GoalType | msgspec.UnsetType = msgspec.UNSET
    criteria: CriteriaObject | msgspec.UnsetType = msgspec.UNSET
    is_active: bool | msgspec.UnsetType = msgspec.UNSET
    mode: GoalMode | msgspec.UnsetType = msgspec.UNSET
    # null removes the window
    conversion_window_seconds: WindowSeconds | msgspec.UnsetType | None = msgspec.UNSET


class GoalOut(msgspec.Struct, kw_only=True):
    """A goal as the API returns it."""

    id: uuid.UUID
    workflow_id: uuid.UUID
    tenant_id: uuid.UUID
    goal_type: GoalType
    criteria: dict[str, Any]
    is_active: bool
    mode: GoalMode
    conversion_window_seconds: int | None
    created_at: datetime
    updated_at: datetime


class GoalList(msgspec.Struct, kw_only=True):
    """The goals of a workflow (deleted ones left out)."""

    items: list[GoalOut]


class GoalStats(msgspec.Struct, kw_only=True):
    """One goal's numbers; deleted goals with achievements stay listed, with `deleted` true."""

    goal_id: uuid.UUID
    goal_type: GoalType
    achievements: int
    conversion_rate: float
    avg_seconds_to_goal: float | None
    median_seconds_to_goal: float | None
    deleted: bool


class DailyCount(msgspec.Struct, kw_only=True):
    """Achievements of one UTC day."""

    date: str
    achievements: int


class WorkflowStats(msgspec.Struct, kw_only=True):
    """A workflow's goal statistics (CONTRACT 5)."""

    workflow_id: uuid.UUID
    enrollments_total: int
    enrollments_achieved: int
    conversion_rate: float
    goals: list[GoalStats]
    daily: list[DailyCount]


class ErrorDetail(msgspec.Struct, kw_only=True):
    """Which input was wrong, and how."""

    key: str
    message: str
    source: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: the status, a sentence, and the offending fields if any."""

    status_code: int
    detail: str
    extra: list[ErrorDetail] | dict[str, Any] | None = None
