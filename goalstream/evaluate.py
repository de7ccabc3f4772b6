"""The pure core: which active goals does each event of a batch meet? No I/O here.

The index groups goals by (tenant, event type). Within a group, goals with an exact key (a tag,
a form, a stage, a product, a calendar) are found by dictionary lookup; only goals without one
(glob patterns, "any purchase", "any booking") are scanned, and only within their tenant.
Whether an enrolled contact is eligible (status, enrolment time, window) is the sink's question,
answered in PostgreSQL for the whole batch at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence

from goalstream import constants
from goalstream.events import Decoded, Event
from goalstream.goals import Goal, IndexKey

BucketKey = tuple[uuid.UUID, str]


def _event_key(event: Event) -> IndexKey:
    return _EVENT_KEYS[event.type_name](event)


_EVENT_KEYS: dict[str, Callable[[Event], IndexKey]] = {
    constants.TAG_ADDED: lambda e: e.data.tag.casefold(),  # type: ignore[union-attr]
    constants.PAYMENT_COMPLETED: lambda e: (
        None if e.data.product_id is None else str(e.data.product_id)  # type: ignore[union-attr]
    ),
    constants.APPOINTMENT_BOOKED: lambda e: str(e.data.calendar_id),  # type: ignore[union-attr]
    constants.FORM_SUBMITTED: lambda e: str(e.data.form_id),  # type: ignore[union-attr]
    constants.PIPELINE_STAGE_CHANGED: lambda e: (
        str(e.data.pipeline_id),  # type: ignore[union-attr]
        str(e.data.stage_id),  # type: ignore[union-attr]
    ),
}


class Bucket:
    """The active goals of one tenant for one event type."""

    __slots__ = ("by_key", "scan")

    def __init__(self) -> None:
        self.by_key: dict[IndexKey, list[Goal]] = {}
        self.scan: list[Goal] = []

    def add(self, goal: Goal) -> None:
        key = goal.criteria.index_key()
        if key is None:
            self.scan.append(goal)
        else:
            self.by_key.setdefault(key, []).append(goal)

    def remove(self, goal: Goal) -> None:
        key = goal.criteria.index_key()
        goals = self.scan if key is None else self.by_key.get(key, [])
        goals[:] = [g for g in goals if g.id != goal.id]
        if key is not None and not goals:
            self.by_key.pop(key, None)

    def __bool__(self) -> bool:
        return bool(self.scan or self.by_key)


class GoalIndex:
    """An in-process index of active goals, changed goal by goal as the config cache learns."""

    def __init__(self, goals: Iterable[Goal] = ()) -> None:
        self._goals: dict[uuid.UUID, Goal] = {}
        self._buckets: dict[BucketKey, Bucket] = {}
        self._by_workflow: dict[uuid.UUID, set[uuid.UUID]] = {}
        for goal in goals:
            self.put(goal)

    def __len__(self) -> int:
        return len(self._goals)

    def __contains__(self, goal_id: object) -> bool:
        return goal_id in self._goals

    def get(self, goal_id: uuid.UUID) -> Goal | None:
        return self._goals.get(goal_id)

    def put(self, goal: Goal) -> None:
        """Add a goal, or replace the one with its id."""
        self.discard(goal.id)
        self._goals[goal.id] = goal
        self._by_workflow.setdefault(goal.workflow_id, set()).add(goal.id)
        key = (goal.tenant_id, goal.event_type)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket()
        bucket.add(goal)

    def discard(self, goal_id: uuid.UUID) -> None:
        """Forget a goal if it is there."""
        goal = self._goals.pop(goal_id, None)
        if goal is None:
            return
        siblings = self._by_workflow[goal.workflow_id]
        siblings.discard(goal_id)
        if not siblings:
            del self._by_workflow[goal.workflow_id]
        key = (goal.tenant_id, goal.event_type)
        bucket = self._buckets[key]
        bucket.remove(goal)
        if not bucket:
            del self._buckets[key]

    def goals_of_workflow(self, workflow_id: uuid.UUID) -> list[uuid.UUID]:
        """Ids of the cached goals that belong to a workflow."""
        return list(self._by_workflow.get(workflow_id, ()))

    def matching(self, event: Event) -> list[Goal]:
        """The goals of the event's tenant whose criteria the event meets."""
        bucket = self._buckets.get((event.tenant_id, event.type_name))
        if bucket is None:
            return []
        data = event.data
        found = [g for g in bucket.scan if g.criteria.matches(data)]  # type: ignore[arg-type]
        keyed = bucket.by_key.get(_event_key(event)) if bucket.by_key else None
        if keyed:
            found.extend(g for g in keyed if g.criteria.matches(data))  # type: ignore[arg-type]
        return found


def evaluate(events: Sequence[Decoded], index: GoalIndex) -> list[tuple[int, Goal]]:
    """Every (position in `events`, goal) pair where the event meets the goal's criteria."""
    matches: list[tuple[int, Goal]] = []
    matching = index.matching
    for position, decoded in enumerate(events):
        for goal in matching(decoded.event):
            matches.append((position, goal))
    return matches
