"""The admin HTTP API (CONTRACT 5) against real PostgreSQL and Redis: routes, errors, keys."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from goalstream import apikeys
from goalstream.admin import create_app
from goalstream.settings import Settings
from tests.admin_support import Caller, alice, api, bob
from tests.conftest import World

__all__ = ["alice", "api", "bob"]  # fixtures used below

TAG_GOAL = {"goal_type": "tag_added", "criteria": {"tag": "vip"}}


async def test_goal_crud_happy_path(alice: Caller) -> None:
    """Create, list, read, change and delete a goal, each with the contract's status and body."""
    created = await alice.create(
        {
            "goal_type": "purchase_made",
            "criteria": {"min_amount": 10.5, "currency": "EUR"},
            "mode": "measure",
            "conversion_window_seconds": 3600,
        }
    )
    assert set(created) == {
        "id",
        "workflow_id",
        "tenant_id",
        "goal_type",
        "criteria",
        "is_active",
        "mode",
        "conversion_window_seconds",
        "created_at",
        "updated_at",
    }
    assert created["criteria"] == {"min_amount": "10.5", "currency": "EUR"}
    assert (created["mode"], created["is_active"], created["conversion_window_seconds"]) == (
        "measure",
        True,
        3600,
    )
    assert created["tenant_id"] == str(alice.tenant_id)
    goal_path = f"{alice.goals_path()}/{created['id']}"

    listed = await alice.request("GET", alice.goals_path())
    assert listed.status_code == 200
    assert [g["id"] for g in listed.json()["items"]] == [created["id"]]

    read = await alice.request("GET", goal_path)
    assert (read.status_code, read.json()) == (200, created)

    changed = await alice.request(
        "PATCH", goal_path, {"is_active": False, "conversion_window_seconds": None}
    )
    assert changed.status_code == 200
    body = changed.json()
    assert (body["is_active"], body["conversion_window_seconds"]) == (False, None)
    assert body["criteria"] == created["criteria"]  # untouched fields keep their values
    assert body["updated_at"] >= created["updated_at"]

    retyped = await alice.request(
        "PATCH", goal_path, {"goal_type": "form_submitted", "criteria": {"form_id": "f1"}}
    )
    assert retyped.status_code == 200
    assert (retyped.json()["goal_type"], retyped.json()["criteria"]) == (
        "form_submitted",
        {"form_id": "f1"},
    )

    deleted = await alice.request("DELETE", goal_path)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert (await alice.request("GET", goal_path)).status_code == 404
    assert (await alice.request("GET", alice.goals_path())).json() == {"items": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"criteria": {"tag": "x"}}, "goal_type"),
        ({"goal_type": "tag_added"}, "criteria"),
        ({"goal_type": "tag_addedd", "criteria": {}}, "goal_type"),
        ({"goal_type": "tag_added", "criteria": {"tag": "x", "colour": "red"}}, "criteria.colour"),
        ({"goal_type": "tag_added", "criteria": {"tag": "a", "tag_pattern": "b*"}}, "criteria"),
        ({"goal_type": "tag_added", "criteria": {"tag": 7}}, "criteria.tag"),
        ({"goal_type": "form_submitted", "criteria": {}}, "criteria.form_id"),
        ({"goal_type": "pipeline_stage_reached", "criteria": {"pipeline_id": "p"}}, "criteria"),
        ({"goal_type": "purchase_made", "criteria": {"currency": "EURO"}}, "criteria.currency"),
        ({"goal_type": "purchase_made", "criteria": {"min_amount": -1}}, "criteria"),
        ({"goal_type": "appointment_booked", "criteria": []}, "criteria"),
        ({"goal_type": "tag_added", "criteria": {"tag": "a\u0000b"}}, "criteria"),
        ({**TAG_GOAL, "mode": "sometimes"}, "mode"),
        ({**TAG_GOAL, "conversion_window_seconds": 0}, "conversion_window_seconds"),
        ({**TAG_GOAL, "is_active": "yes"}, "is_active"),
        ({**TAG_GOAL, "owner": "me"}, "owner"),
    ],
)
async def test_invalid_goal_is_400_naming_the_field(
    alice: Caller, body: dict[str, Any], field: str
) -> None:
    """Each invalid POST body is refused with 400 and an error naming the offending field."""
    response = await alice.request("POST", alice.goals_path(), body)
    assert response.status_code == 400, response.text
    error = response.json()
    keys = [item["key"] for item in error["extra"]]
    assert any(key.startswith(field) or key == field for key in keys), error
    listed = await alice.request("GET", alice.goals_path())
    assert listed.json() == {"items": []}


@pytest.mark.parametrize("depth", [50, 900, 5000])
async def test_deeply_nested_body_is_400(alice: Caller, depth: int) -> None:
    """A body nested deeper than anything valid (even past the parser's limit) is 400."""
    nested = '{"a":' * depth + "1" + "}" * depth
    body = '{"goal_type": "tag_added", "criteria": ' + nested + "}"
    headers = {**alice.headers, "Content-Type": "application/json"}
    goal = await alice.create(TAG_GOAL)
    for method, path in [
        ("POST", alice.goals_path()),
        ("PATCH", f"{alice.goals_path()}/{goal['id']}"),
    ]:
        response = await alice.client.request(method, path, content=body, headers=headers)
        assert response.status_code == 400, (depth, method, response.text)
    assert (await alice.request("GET", alice.goals_path())).json()["items"] == [goal]


async def test_invalid_patch_is_400_and_changes_nothing(alice: Caller) -> None:
    """A PATCH whose new type does not fit the goal's criteria, or with bad fields, is 400."""
    goal = await alice.create(TAG_GOAL)
    path = f"{alice.goals_path()}/{goal['id']}"
    for body, field in [
        ({"goal_type": "form_submitted"}, "criteria.tag"),  # tag is not a form criterion
        ({"criteria": {"tag_pattern": "v*", "tag": "x"}}, "criteria"),
        ({"mode": "later"}, "mode"),
        ({"conversion_window_seconds": -5}, "conversion_window_seconds"),
    ]:
        response = await alice.request("PATCH", path, body)
        assert response.status_code == 400, response.text
        assert field in [item["key"] for item in response.json()["extra"]]
    assert (await alice.request("GET", path)).json() == goal


async def test_duplicate_goal_is_409(alice: Caller) -> None:
    """The same type and criteria twice in one workflow is 409, by POST or by PATCH."""
    await alice.create({"goal_type": "tag_added", "criteria": {"tag": "vip"}})
    again = await alice.request(
        "POST", alice.goals_path(), {"goal_type": "tag_added", "criteria": {"tag": "vip"}}
    )
    assert again.status_code == 409
    assert again.json()["extra"][0]["key"] == "criteria"
    other = await alice.create({"goal_type": "tag_added", "criteria": {"tag": "gold"}})
    clash = await alice.request(
        "PATCH", f"{alice.goals_path()}/{other['id']}", {"criteria": {"tag": "vip"}}
    )
    assert clash.status_code == 409
    listed = (await alice.request("GET", alice.goals_path())).json()["items"]
    assert sorted(g["criteria"]["tag"] for g in listed) == ["gold", "vip"]


async def test_deleted_goal_can_be_created_again(alice: Caller) -> None:
    """Deleting frees the (type, criteria) slot: the same goal can be created anew."""
    goal = await alice.create(TAG_GOAL)
    assert (await alice.request("DELETE", f"{alice.goals_path()}/{goal['id']}")).status_code == 204
    again = await alice.create(TAG_GOAL)
    assert again["id"] != goal["id"]


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer gs_not-a-real-key", "Token x"],
)
async def test_missing_or_unknown_key_is_401(alice: Caller, authorization: str | None) -> None:
    """Without a valid bearer key every /api route answers 401 with a Bearer challenge."""
    headers = {} if authorization is None else {"Authorization": authorization}
    goal_path = f"{alice.goals_path()}/{uuid.uuid4()}"
    for method, path in [
        ("GET", alice.goals_path()),
        ("POST", alice.goals_path()),
        ("GET", goal_path),
        ("PATCH", goal_path),
        ("DELETE", goal_path),
        ("GET", alice.goals_path() + "/stats"),
    ]:
        response = await alice.client.request(method, path, headers=headers, json=TAG_GOAL)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_revoked_key_is_401(alice: Caller, world: World) -> None:
    """A key works until it is revoked, and never after."""
    assert (await alice.request("GET", alice.goals_path())).status_code == 200
    assert await apikeys.revoke_api_key(world.db, alice.key) is True
    assert (await alice.request("GET", alice.goals_path())).status_code == 401
    assert await apikeys.revoke_api_key(world.db, alice.key) is False


async def test_only_the_key_hash_is_stored(alice: Caller, world: World) -> None:
    """The api_keys table holds the key's SHA-256, never the key."""
    rows = await world.db.fetch(
        "SELECT key_hash FROM api_keys WHERE tenant_id = $1", alice.tenant_id
    )
    assert [r["key_hash"] for r in rows] == [apikeys.hash_key(alice.key)]
    assert alice.key not in rows[0]["key_hash"]


async def test_unknown_workflow_or_goal_is_404(alice: Caller, world: World) -> None:
    """A workflow or goal that does not exist, or was deleted, is 404 on every route."""
    nowhere = alice.goals_path(uuid.uuid4())
    for method, path, body in [
        ("GET", nowhere, None),
        ("POST", nowhere, TAG_GOAL),
        ("GET", nowhere + "/stats", None),
        ("GET", f"{alice.goals_path()}/{uuid.uuid4()}", None),
        ("PATCH", f"{alice.goals_path()}/{uuid.uuid4()}", {"is_active": False}),
        ("DELETE", f"{alice.goals_path()}/{uuid.uuid4()}", None),
    ]:
        response = await alice.request(method, path, body)
        assert response.status_code == 404, (method, path, response.text)
    goal = await alice.create(TAG_GOAL)
    gone = f"{alice.goals_path()}/{goal['id']}"
    assert (await alice.request("DELETE", gone)).status_code == 204
    for method, body in [("GET", None), ("PATCH", {"is_active": True}), ("DELETE", None)]:
        assert (await alice.request(method, gone, body)).status_code == 404
    # a goal of another workflow of the same tenant is not under this workflow's path
    second = await world.workflow()
    other = await alice.create(TAG_GOAL, workflow_id=second)
    for method, body in [("GET", None), ("PATCH", {"is_active": False}), ("DELETE", None)]:
        response = await alice.request(method, f"{alice.goals_path()}/{other['id']}", body)
        assert response.status_code == 404
    assert (await alice.request("GET", alice.goals_path(second))).json()["items"] == [other]


async def test_tenants_never_reach_each_others_data(alice: Caller, bob: Caller) -> None:
    """Bob's key gets 404 for everything of Alice's, and changes none of it."""
    goal = await alice.create(TAG_GOAL)
    alice_goal = f"{alice.goals_path()}/{goal['id']}"
    for method, path, body in [
        ("GET", alice.goals_path(), None),
        ("POST", alice.goals_path(), {"goal_type": "tag_added", "criteria": {"tag": "x"}}),
        ("GET", alice_goal, None),
        ("PATCH", alice_goal, {"is_active": False}),
        ("DELETE", alice_goal, None),
        ("GET", alice.goals_path() + "/stats", None),
        # Alice's goal id under Bob's own workflow is no way round it either
        ("GET", f"{bob.goals_path()}/{goal['id']}", None),
        ("PATCH", f"{bob.goals_path()}/{goal['id']}", {"is_active": False}),
        ("DELETE", f"{bob.goals_path()}/{goal['id']}", None),
    ]:
        response = await bob.request(method, path, body)
        assert response.status_code == 404, (method, path, response.text)
    assert (await alice.request("GET", alice_goal)).json() == goal
    assert (await alice.request("GET", alice.goals_path())).json()["items"] == [goal]
    assert (await bob.request("GET", bob.goals_path())).json() == {"items": []}


async def test_health_ready_metrics_and_openapi(alice: Caller) -> None:
    """/healthz and /readyz answer 200, /metrics counts requests by route and status."""
    await alice.request("GET", alice.goals_path())
    await alice.request("GET", f"{alice.goals_path()}/{uuid.uuid4()}")
    client = alice.client
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    text = (await client.get("/metrics")).text
    route = 'route="/api/v1/workflows/{workflow_id}/goals/{goal_id}",status="404"'
    assert f'goalstream_admin_requests_total{{method="GET",{route}}} 1.0' in text
    assert "goalstream_admin_request_duration_seconds_bucket" in text
    document = (await client.get("/schema/openapi.json")).json()
    assert "/api/v1/workflows/{workflow_id}/goals/stats" in document["paths"]


async def test_server_down_is_503_never_500(alice: Caller, settings: Settings) -> None:
    """With PostgreSQL or Redis unreachable, /readyz and the API answer 503; /healthz 200."""
    dead = "127.0.0.1:1"
    for broken in (
        Settings(database_url=f"postgresql://postgres@{dead}/x", redis_url=settings.redis_url),
        Settings(database_url=settings.database_url, redis_url=f"redis://{dead}/0"),
    ):
        async with AsyncTestClient(create_app(broken)) as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            stats = await client.get(alice.goals_path() + "/stats", headers=alice.headers)
            assert stats.status_code == 503, stats.text
            assert stats.headers["retry-after"] == "1"


async def test_api_key_cli_prints_a_working_key(
    world: World, api: AsyncTestClient[Litestar], settings: Settings
) -> None:
    """`goalstream create-api-key --tenant` prints a key as its last line, and the key works."""
    import asyncio
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "goalstream.cli",
        "create-api-key",
        "--tenant",
        str(world.tenant_id),
        "--database-url",
        settings.database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    key = out.decode().strip().splitlines()[-1]
    workflow_id = await world.workflow()
    response = await api.get(
        f"/api/v1/workflows/{workflow_id}/goals", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200
    unknown = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "goalstream.cli",
        "create-api-key",
        "--tenant",
        str(uuid.uuid4()),
        "--database-url",
        settings.database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await unknown.communicate()
    assert unknown.returncode != 0
    assert b"no tenant" in err
