"""The local demo: a tenant with workflows and goals of all five types, events, and a summary.

`goalstream dev` seeds a fresh demo tenant on every run (so the summary is this run's alone),
publishes events that mostly could match a goal, some that cannot, and a few invalid ones, and
reads back what the workers made of them.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from goalstream import constants, seed
from goalstream.admin.stats import compute_stats

# (workflow name, [(goal_type, criteria, mode, conversion window seconds)]): all five goal types.
WORKFLOWS: list[tuple[str, list[tuple[str, dict[str, Any], str, int | None]]]] = [
    (
        "Onboarding",
        [
            ("tag_added", {"tag": "vip"}, "exit", None),
            ("form_submitted", {"form_id": "demo-request"}, "exit", None),
        ],
    ),
    (
        "Sales pipeline",
        [
            ("pipeline_stage_reached", {"pipeline_id": "sales", "stage_id": "won"}, "exit", None),
            ("purchase_made", {"min_amount": "100", "currency": "USD"}, "measure", None),
        ],
    ),
    (
        "Bookings",
        [
            ("appointment_booked", {"calendar_id": "consult"}, "exit", 3 * 86400),
            ("tag_added", {"tag_pattern": "promo-*"}, "measure", None),
            ("purchase_made", {}, "measure", None),
        ],
    ),
]
# Contacts scale with the demo's events (about eight events each), within these bounds, so
# that conversion stays short of 100% whatever the demo's size.
MIN_CONTACTS, MAX_CONTACTS, EVENTS_PER_CONTACT = 200, 5000, 8
ENROLL_SHARE = 0.6  # each contact joins each workflow with this probability
PENDING_ACTIONS, WAITS = 2, 1
INVALID_EVERY = 500  # one invalid event per this many (at least one): a few, not a flood

TAGS = ["vip", "newsletter", "promo-spring", "promo-summer", "cold-lead", "VIP"]
FORMS = ["demo-request", "contact-us", "newsletter-signup"]
STAGES = ["lead", "qualified", "proposal", "won", "lost"]
CALENDARS = ["consult", "support"]


@dataclass
class DemoTenant:
    """What the demo seeded: ids the events and the summary need."""

    tenant_id: uuid.UUID
    workflows: dict[uuid.UUID, str]
    goals: int
    contacts: list[uuid.UUID]
    enrollments: int


def contacts_for(events: int) -> int:
    """How many contacts a demo of this many events gets."""
    return max(MIN_CONTACTS, min(MAX_CONTACTS, events // EVENTS_PER_CONTACT))


async def seed_demo(
    conn: asyncpg.Connection, rng: random.Random, contacts: int = MIN_CONTACTS
) -> DemoTenant:
    """A fresh demo tenant: workflows, goals, contacts, enrolments, pending actions and waits."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    tenant_id = await seed.tenant(conn, f"goalstream demo {stamp}")
    workflows: dict[uuid.UUID, str] = {}
    goals = 0
    for name, goal_specs in WORKFLOWS:
        workflow_id = await seed.workflow(conn, tenant_id, name)
        workflows[workflow_id] = name
        for goal_type, criteria, mode, window in goal_specs:
            await seed.goal(
                conn,
                tenant_id,
                workflow_id,
                goal_type,
                criteria,
                mode=mode,
                conversion_window_seconds=window,
            )
            goals += 1
    contact_ids = list(await seed.contacts(conn, tenant_id, contacts))
    now = datetime.now(UTC)
    enrollments = 0
    for contact_id in contact_ids:
        for workflow_id in workflows:
            if rng.random() >= ENROLL_SHARE:
                continue
            enrolled_at = now - timedelta(seconds=rng.uniform(60, 7 * 86400))
            await seed.enrollment(
                conn,
                tenant_id,
                workflow_id,
                contact_id,
                enrolled_at=enrolled_at,
                pending_actions=PENDING_ACTIONS,
                waits=WAITS,
            )
            enrollments += 1
    return DemoTenant(tenant_id, workflows, goals, contact_ids, enrollments)


def event_data(event_type: str, rng: random.Random) -> dict[str, Any]:
    """Realistic data for an event type; some of it meets a demo goal, most does not."""
    if event_type == constants.TAG_ADDED:
        return {"tag": rng.choice(TAGS)}
    if event_type == constants.PAYMENT_COMPLETED:
        return {
            "amount": f"{rng.uniform(5, 300):.2f}",
            "currency": rng.choice(["USD", "USD", "EUR"]),
            "product_id": f"sku-{rng.randint(1, 20)}",
            "payment_id": uuid.uuid4().hex,
        }
    if event_type == constants.APPOINTMENT_BOOKED:
        return {"calendar_id": rng.choice(CALENDARS), "appointment_id": uuid.uuid4().hex}
    if event_type == constants.FORM_SUBMITTED:
        return {"form_id": rng.choice(FORMS), "submission_id": uuid.uuid4().hex}
    return {"pipeline_id": "sales", "stage_id": rng.choice(STAGES)}


def _invalid(event: dict[str, Any], rng: random.Random) -> bytes:
    """One of the ways producers get events wrong; the worker dead-letters each."""
    kind = rng.randrange(4)
    if kind == 0:
        return b'{"id": "broken", "type": '  # malformed JSON
    if kind == 1:
        event["data"] = {}  # a required field missing
    elif kind == 2:
        event["tenant_id"] = "not-a-uuid"
    else:
        event["occurred_at"] = "yesterday"
    return msgspec.json.encode(event)


@dataclass
class DemoEvents:
    """The events to publish, as (event type, encoded envelope), and how many are invalid."""

    items: list[tuple[str, bytes]] = field(default_factory=list)
    invalid: int = 0


def demo_events(demo: DemoTenant, n: int, rng: random.Random) -> DemoEvents:
    """n events of all five types for the demo's contacts; one in INVALID_EVERY invalid."""
    out = DemoEvents()
    now = datetime.now(UTC).isoformat()
    invalid = set(rng.sample(range(n), min(n, max(1, n // INVALID_EVERY)))) if n else set()
    for i in range(n):
        event_type = rng.choice(constants.DEFAULT_STREAMS)
        event: dict[str, Any] = {
            "id": f"demo-{i}-{uuid.uuid4().hex[:8]}",
            "type": event_type,
            "tenant_id": str(demo.tenant_id),
            "contact_id": str(rng.choice(demo.contacts)),
            "occurred_at": now,
            "data": event_data(event_type, rng),
        }
        if i in invalid:
            out.items.append((event_type, _invalid(event, rng)))
            out.invalid += 1
        else:
            out.items.append((event_type, msgspec.json.encode(event)))
    return out


@dataclass
class GoalLine:
    """One row of the summary's per-goal table."""

    goal_id: uuid.UUID
    workflow: str
    goal_type: str
    criteria: str
    mode: str
    achievements: int


@dataclass
class WorkflowLine:
    """One row of the summary's per-workflow table."""

    workflow_id: uuid.UUID
    name: str
    enrollments: int
    achieved: int
    conversion_rate: float


def _compact(criteria: str) -> str:
    return msgspec.json.encode(msgspec.json.decode(criteria)).decode()


_PER_GOAL = """
SELECT g.id, w.name, g.goal_type::text AS goal_type, g.criteria::text AS criteria, g.mode,
       count(a.id)::bigint AS achievements
FROM workflow_goals g
JOIN workflows w ON w.id = g.workflow_id
LEFT JOIN workflow_goal_achievements a ON a.goal_config_id = g.id
WHERE g.tenant_id = $1
GROUP BY g.id, w.name
ORDER BY w.name, g.created_at, g.id
"""


async def summary(
    conn: asyncpg.Connection, demo: DemoTenant
) -> tuple[list[GoalLine], list[WorkflowLine]]:
    """Achievements per goal and conversion per workflow, from the database."""
    goals = [
        GoalLine(
            r["id"],
            r["name"],
            r["goal_type"],
            _compact(r["criteria"]),
            r["mode"],
            r["achievements"],
        )
        for r in await conn.fetch(_PER_GOAL, demo.tenant_id)
    ]
    workflows = []
    for workflow_id, name in demo.workflows.items():
        stats = await compute_stats(conn, workflow_id)
        workflows.append(
            WorkflowLine(
                workflow_id,
                name,
                stats.enrollments_total,
                stats.enrollments_achieved,
                stats.conversion_rate,
            )
        )
    return goals, workflows
