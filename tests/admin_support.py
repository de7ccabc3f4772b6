"""Fixtures for the admin API tests: the app in-process, tenants with keys, a served instance."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import AsyncTestClient

from goalstream import apikeys, seed
from goalstream.admin import create_app
from goalstream.settings import Settings
from tests.conftest import World

API = "/api/v1/workflows/{workflow}/goals"


@dataclass
class Caller:
    """One tenant's view of the API: its key, a workflow of its own, and request helpers."""

    client: AsyncTestClient[Litestar]
    tenant_id: uuid.UUID
    key: str
    workflow_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def goals_path(self, workflow_id: uuid.UUID | None = None) -> str:
        return API.format(workflow=workflow_id or self.workflow_id)

    async def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.client.request(method, path, json=body, headers=self.headers)

    async def create(self, body: dict[str, Any], workflow_id: uuid.UUID | None = None) -> Any:
        """POST a goal that must be accepted; return its JSON."""
        response = await self.request("POST", self.goals_path(workflow_id), body)
        assert response.status_code == 201, response.text
        return response.json()


async def make_caller(
    client: AsyncTestClient[Litestar], db: asyncpg.Connection, tenant_id: uuid.UUID
) -> Caller:
    """A caller for a tenant: a fresh key and a fresh workflow."""
    key = await apikeys.create_api_key(db, tenant_id)
    workflow_id = await seed.workflow(db, tenant_id, "onboarding")
    return Caller(client, tenant_id, key, workflow_id)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The admin app in-process (its lifespan runs), with a low stats rate limit."""
    app = create_app(settings, rate_limit=5, pool_size=4)
    async with AsyncTestClient(app) as client:
        yield client


@pytest.fixture
async def alice(api: AsyncTestClient[Litestar], world: World) -> Caller:
    """The world's tenant, with a key and a workflow."""
    return await make_caller(api, world.db, world.tenant_id)


@pytest.fixture
async def bob(api: AsyncTestClient[Litestar], world: World) -> Caller:
    """A second tenant, with a key and a workflow of its own."""
    return await make_caller(api, world.db, await seed.tenant(world.db, "bob"))


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float) -> bool:
    """Poll `check` until it holds or `within` seconds pass; True if it held."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served(app: Litestar) -> Iterator[str]:
    """Serve an app on uvicorn in a thread (its own event loop); yield its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="admin-api", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the admin API did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
