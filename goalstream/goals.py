"""Goals as types: the five goal types, their criteria, and how each criterion matches an event.

One definition of a valid goal, shared by the worker's cache and the admin API.
"""

from __future__ import annotations

import enum
import uuid
from decimal import Decimal
from typing import Annotated, Any

import msgspec

from goalstream import constants
from goalstream.events import (
    AppointmentBooked,
    FormSubmitted,
    PaymentCompleted,
    PipelineStageChanged,
    TagAdded,
)

# PostgreSQL's jsonb refuses NUL characters, so criteria may not hold them.
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern="^[^\x00]*$")]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Za-z]{3}$")]
WindowSeconds = Annotated[int, msgspec.Meta(gt=0, le=10 * 365 * 86400)]


class GoalType(enum.StrEnum):
    TAG_ADDED = "tag_added"
    PURCHASE_MADE = "purchase_made"
    APPOINTMENT_BOOKED = "appointment_booked"
    FORM_SUBMITTED = "form_submitted"
    PIPELINE_STAGE_REACHED = "pipeline_stage_reached"


class GoalMode(enum.StrEnum):
    EXIT = "exit"  # achieving the goal takes the contact out of the workflow
    MEASURE = "measure"  # achieving the goal is only recorded


# Lookup key an event or goal is indexed by; None means "scan" (wildcards, patterns).
IndexKey = str | tuple[str, str] | None


def glob_match(pattern: str, text: str) -> bool:
    """Whether `text` matches a glob where `*` is any run and `?` any one character.

    Two pointers, backtracking only to the last `*`: O(len(pattern) * len(text)) at worst,
    unlike a regex, which a pattern like `*a*a*a*a*b` can make take exponential time.
    """
    p = t = 0
    star = -1  # position in pattern just after the last `*` seen
    resume = 0  # position in text where that `*` would take one more character
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p + 1, t
            p += 1
        elif p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif star >= 0:
            resume += 1
            p, t = star, resume
        else:
            return False
    return all(ch == "*" for ch in pattern[p:])


class TagCriteria(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of `tag` (exact) or `tag_pattern` (glob), both case-insensitive."""

    tag: NonEmpty | None = None
    tag_pattern: NonEmpty | None = None

    def __post_init__(self) -> None:
        if (self.tag is None) == (self.tag_pattern is None):
            raise ValueError("exactly one of `tag` or `tag_pattern` is required")

    def index_key(self) -> IndexKey:
        return self.tag.casefold() if self.tag is not None else None

    def matches(self, data: TagAdded) -> bool:
        tag = data.tag.casefold()
        if self.tag is not None:
            return tag == self.tag.casefold()
        return glob_match((self.tag_pattern or "").casefold(), tag)


class PurchaseCriteria(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Optional product, minimum amount (inclusive) and currency; `{}` matches any purchase."""

    product_id: NonEmpty | None = None
    min_amount: Decimal | None = None
    currency: Currency | None = None

    def __post_init__(self) -> None:
        if self.min_amount is not None and (not self.min_amount.is_finite() or self.min_amount < 0):
            raise ValueError("`min_amount` must be a finite decimal >= 0")

    def index_key(self) -> IndexKey:
        return self.product_id

    def matches(self, data: PaymentCompleted) -> bool:
        if self.product_id is not None and self.product_id != _str(data.product_id):
            return False
        if self.currency is not None and self.currency.upper() != data.currency.upper():
            return False
        return self.min_amount is None or data.amount >= self.min_amount


class AppointmentCriteria(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Optional calendar and service; `{}` matches any booking."""

    calendar_id: NonEmpty | None = None
    service_id: NonEmpty | None = None

    def index_key(self) -> IndexKey:
        return self.calendar_id

    def matches(self, data: AppointmentBooked) -> bool:
        if self.calendar_id is not None and self.calendar_id != str(data.calendar_id):
            return False
        return self.service_id is None or self.service_id == _str(data.service_id)


class FormCriteria(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One form, by id."""

    form_id: NonEmpty

    def index_key(self) -> IndexKey:
        return self.form_id

    def matches(self, data: FormSubmitted) -> bool:
        return self.form_id == str(data.form_id)


class PipelineCriteria(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One stage of one pipeline."""

    pipeline_id: NonEmpty
    stage_id: NonEmpty

    def index_key(self) -> IndexKey:
        return (self.pipeline_id, self.stage_id)

    def matches(self, data: PipelineStageChanged) -> bool:
        return self.pipeline_id == str(data.pipeline_id) and self.stage_id == str(data.stage_id)


Criteria = TagCriteria | PurchaseCriteria | AppointmentCriteria | FormCriteria | PipelineCriteria

CRITERIA_TYPES: dict[GoalType, type[Criteria]] = {
    GoalType.TAG_ADDED: TagCriteria,
    GoalType.PURCHASE_MADE: PurchaseCriteria,
    GoalType.APPOINTMENT_BOOKED: AppointmentCriteria,
    GoalType.FORM_SUBMITTED: FormCriteria,
    GoalType.PIPELINE_STAGE_REACHED: PipelineCriteria,
}

# Which event type each goal type listens to (CONTRACT 2).
EVENT_TYPE_OF: dict[GoalType, str] = {
    GoalType.TAG_ADDED: constants.TAG_ADDED,
    GoalType.PURCHASE_MADE: constants.PAYMENT_COMPLETED,
    GoalType.APPOINTMENT_BOOKED: constants.APPOINTMENT_BOOKED,
    GoalType.FORM_SUBMITTED: constants.FORM_SUBMITTED,
    GoalType.PIPELINE_STAGE_REACHED: constants.PIPELINE_STAGE_CHANGED,
}


def _str(value: str | int | None) -> str | None:
    return None if value is None else str(value)


def parse_goal_type(value: Any) -> GoalType:
    """The goal type named by `value`, or a ValueError naming the allowed ones."""
    try:
        return GoalType(value)
    except ValueError:
        allowed = ", ".join(t.value for t in GoalType)
        raise ValueError(f"`goal_type` must be one of: {allowed}") from None


def parse_criteria(goal_type: GoalType, criteria: Any) -> Criteria:
    """Validate a criteria object for a goal type; ValueError names the offending field."""
    if not isinstance(criteria, dict):
        raise ValueError("`criteria` must be an object")
    try:
        return msgspec.convert(criteria, CRITERIA_TYPES[goal_type])
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid `criteria` for {goal_type.value}: {exc}") from None


def criteria_json(criteria: Criteria) -> str:
    """The canonical JSON stored in `workflow_goals.criteria` (defaults omitted)."""
    return msgspec.json.encode(criteria).decode()


class Goal(msgspec.Struct, frozen=True, kw_only=True):
    """An active goal as the worker's cache holds it."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    workflow_id: uuid.UUID
    goal_type: GoalType
    criteria: Criteria
    mode: GoalMode = GoalMode.EXIT
    conversion_window_seconds: int | None = None

    @property
    def event_type(self) -> str:
        return EVENT_TYPE_OF[self.goal_type]
