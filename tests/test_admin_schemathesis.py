"""Property-based: requests generated from the served OpenAPI document never get a 5xx."""

from __future__ import annotations

import asyncio
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from goalstream import apikeys
from goalstream.admin import create_app
from goalstream.settings import Settings
from tests.admin_support import served
from tests.conftest import World

schemathesis = pytest.importorskip("schemathesis")

# Examples per operation and generation mode (valid or invalid input): enough to hit every
# error path, few enough to keep the test within seconds.
EXAMPLES = 40


def criteria_for(goal_type: str) -> st.SearchStrategy[dict[str, Any]]:
    """Criteria of the right keys for a goal type, with arbitrary (maybe invalid) values."""
    # Arbitrary text, plus what PostgreSQL or the validators are known to choke on.
    text = st.one_of(
        st.text(max_size=12),
        st.sampled_from(["\x00", "vip\x00", "", "x" * 201, "\udcff", "*?[", "\u2603"]),
    )
    keys = {
        "tag_added": st.fixed_dictionaries({"tag": text}),
        "purchase_made": st.fixed_dictionaries(
            {},
            optional={
                "product_id": text,
                "min_amount": st.one_of(st.decimals(allow_nan=True).map(str), st.floats()),
                "currency": text,
            },
        ),
        "appointment_booked": st.fixed_dictionaries({}, optional={"calendar_id": text}),
        "form_submitted": st.fixed_dictionaries({"form_id": text}),
        "pipeline_stage_reached": st.fixed_dictionaries({"pipeline_id": text, "stage_id": text}),
    }
    return keys.get(goal_type, st.fixed_dictionaries({}))


def _fuzz(
    schema: Any,
    base_url: str,
    headers: dict[str, str],
    known: dict[str, str],
    statuses: dict[int, int],
) -> int:
    """Run each operation's generated cases against the server; return how many were sent."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=strategy, use_known=st.booleans(), data=st.data())
        def run(case: Any, use_known: bool, data: st.DataObject) -> None:
            nonlocal sent
            # Random UUIDs and random criteria only reach the 404 and 400 paths; half the cases
            # use real ids, and criteria of the right shape, instead.
            if use_known:
                for name, value in known.items():
                    if name in (case.path_parameters or {}):
                        case.path_parameters[name] = value
                if isinstance(case.body, dict) and "criteria" in case.body:
                    goal_type = case.body.get("goal_type", "tag_added")  # the known goal's
                    case.body["criteria"] = data.draw(criteria_for(str(goal_type)))
            anonymous = data.draw(st.integers(0, 9)) == 9  # a tenth go without a key
            response = case.call(base_url=base_url, headers={} if anonymous else headers)
            sent += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case.validate_response(response, checks=checks)

        run()
    return sent


async def test_generated_requests_never_get_a_server_error(
    world: World, settings: Settings
) -> None:
    """Schemathesis cases (valid and invalid) from /schema/openapi.json never get a 5xx."""
    key = await apikeys.create_api_key(world.db, world.tenant_id)
    workflow_id = await world.workflow()
    goal_id = await world.goal(workflow_id, "tag_added", {"tag": "vip"})
    known = {"workflow_id": str(workflow_id), "goal_id": str(goal_id)}
    app = create_app(settings, rate_limit=1_000_000, pool_size=4)
    with served(app) as base_url:
        schema = schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json")
        headers = {"Authorization": f"Bearer {key}"}
        statuses: dict[int, int] = {}
        sent = await asyncio.to_thread(_fuzz, schema, base_url, headers, known, statuses)
    assert sent >= 6 * EXAMPLES  # every operation ran its examples
    # The cases reached past the key check and validation, not only the error paths.
    assert {200, 201, 400, 401, 404} <= set(statuses), statuses
