"""Shared fixtures: real servers for the session, a fresh database and stream keys per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from goalstream import constants, seed
from goalstream.goals import GoalMode, GoalType
from goalstream.migrate import migrate
from goalstream.settings import Settings
from goalstream.worker import Worker
from tests.servers import drop_database, postgres_server, redis_server, with_database


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def template_db(pg_url: str) -> Iterator[str]:
    """A migrated database that every test's database is cloned from."""
    import asyncio

    name = f"gs_tpl_{os.getpid()}"

    async def create() -> None:
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        finally:
            await admin.close()
        await migrate(with_database(pg_url, name))

    asyncio.run(create())
    yield name
    asyncio.run(drop_database(pg_url, name))


@pytest.fixture
async def database_url(pg_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh database of this test's own, cloned from the migrated template."""
    name = f"gs_t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    finally:
        await admin.close()
    yield with_database(pg_url, name)
    await drop_database(pg_url, name)


@pytest.fixture
def prefix() -> str:
    """This test's own namespace of stream keys."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def settings(redis_url: str, database_url: str, prefix: str) -> Settings:
    """Settings pointing at this test's database and streams; groups take history."""
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        streams=tuple(prefix + s for s in constants.DEFAULT_STREAMS),
        group_start="0",
        consumer=f"{prefix}c1",
        achieved_stream=prefix + constants.ACHIEVED_STREAM,
        dlq_stream=prefix + constants.DLQ_STREAM,
        metrics_port=0,
        block_ms=100,
        log_format="console",
        log_level="WARNING",
    )


@pytest.fixture
async def redis(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@dataclass
class World:
    """A small platform to test against: one tenant, helpers to add to it and to send events."""

    db: asyncpg.Connection
    redis: aioredis.Redis
    settings: Settings
    tenant_id: uuid.UUID
    sent: int = field(default=0)

    async def workflow(
        self, *, is_active: bool = True, tenant_id: uuid.UUID | None = None
    ) -> uuid.UUID:
        return await seed.workflow(self.db, tenant_id or self.tenant_id, is_active=is_active)

    async def contact(self, tenant_id: uuid.UUID | None = None) -> uuid.UUID:
        return await seed.contact(self.db, tenant_id or self.tenant_id)

    async def enroll(
        self, workflow_id: uuid.UUID, contact_id: uuid.UUID, **kwargs: Any
    ) -> uuid.UUID:
        tenant_id = kwargs.pop("tenant_id", None) or self.tenant_id
        # Events without occurred_at take their stream entry's millisecond, which can fall a
        # fraction of a millisecond before an enrolment made just before: enrol a second ago.
        kwargs.setdefault("enrolled_at", datetime.now(UTC) - timedelta(seconds=1))
        return await seed.enrollment(self.db, tenant_id, workflow_id, contact_id, **kwargs)

    async def goal(
        self,
        workflow_id: uuid.UUID,
        goal_type: GoalType | str,
        criteria: dict[str, Any],
        **kwargs: Any,
    ) -> uuid.UUID:
        tenant_id = kwargs.pop("tenant_id", None) or self.tenant_id
        return await seed.goal(self.db, tenant_id, workflow_id, goal_type, criteria, **kwargs)

    def stream(self, event_type: str) -> str:
        prefix = self.settings.streams[0].split(":", 1)[0] + ":"
        return prefix + event_type

    async def send_raw(self, event_type: str, data: bytes | str | None) -> str:
        fields: dict[str, Any] = {"other": "ignored"} if data is None else {"data": data}
        entry_id = await self.redis.xadd(self.stream(event_type), fields)
        return entry_id.decode()  # type: ignore[no-any-return]

    async def send(
        self,
        event_type: str,
        contact_id: uuid.UUID,
        data: dict[str, Any],
        *,
        tenant_id: uuid.UUID | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        self.sent += 1
        envelope: dict[str, Any] = {
            "id": event_id or f"evt-{self.sent}-{uuid.uuid4().hex[:6]}",
            "type": event_type,
            "tenant_id": str(tenant_id or self.tenant_id),
            "contact_id": str(contact_id),
            "data": data,
        }
        if occurred_at is not None:
            envelope["occurred_at"] = occurred_at.isoformat()
        return await self.send_raw(event_type, msgspec.json.encode(envelope))

    async def run_worker(self, **overrides: Any) -> Worker:
        """Run a worker in burst mode: it drains the streams and returns."""
        settings = msgspec.structs.replace(self.settings, **overrides)
        worker = Worker(settings)
        await worker.run(burst=True)
        return worker

    async def achievements(self) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM workflow_goal_achievements ORDER BY achieved_at, id"
        )

    async def announced(self) -> list[dict[str, Any]]:
        entries = await self.redis.xrange(self.settings.achieved_stream)
        return [msgspec.json.decode(fields[b"data"]) for _, fields in entries]

    async def dead_letters(self) -> list[dict[str, str]]:
        entries = await self.redis.xrange(self.settings.dlq_stream)
        return [
            {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            for _, fields in entries
        ]

    async def dead_letters_raw(self) -> list[dict[bytes, bytes]]:
        entries = await self.redis.xrange(self.settings.dlq_stream)
        return [fields for _, fields in entries]

    async def pending(self) -> int:
        total = 0
        for stream in self.settings.streams:
            info = await self.redis.xpending(stream, self.settings.group)
            total += info["pending"]
        return total

    async def enrollment(self, enrollment_id: uuid.UUID) -> asyncpg.Record:
        return await self.db.fetchrow(
            "SELECT * FROM workflow_enrollments WHERE id = $1", enrollment_id
        )

    async def actions(self, enrollment_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM workflow_pending_actions WHERE enrollment_id = $1", enrollment_id
        )


@pytest.fixture
async def world(db: asyncpg.Connection, redis: aioredis.Redis, settings: Settings) -> World:
    tenant_id = await seed.tenant(db, "acme")
    return World(db=db, redis=redis, settings=settings, tenant_id=tenant_id)


__all__ = ["GoalMode", "GoalType", "World"]
