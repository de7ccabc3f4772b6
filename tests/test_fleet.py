"""Whole worker processes against real servers: killed, stopped, cut off, and restarted."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from goalstream.settings import Settings
from tests.fleet_support import (
    Proxy,
    WorkerProcess,
    acknowledged,
    check_fleet_result,
    group_done,
    own_redis,
    postgres_target,
    redis_target,
    seed_fleet,
    via_proxy,
    wait_for,
    workers,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


async def finish(
    database_url: str, redis: aioredis.Redis, settings: Settings, data: object, seconds: float
) -> None:
    """Wait until the group is drained and every achievement is announced, then check it all."""
    await wait_for(lambda: group_done(redis, settings), seconds, "the group to drain")
    last_error: AssertionError | None = None

    async def result_ok() -> bool:
        nonlocal last_error
        try:
            await check_fleet_result(database_url, redis, settings, data)  # type: ignore[arg-type]
        except AssertionError as exc:
            last_error = exc
            return False
        return True

    try:
        await wait_for(result_ok, 30, "every achievement to be written once and announced")
    except AssertionError:
        raise last_error or AssertionError("no result") from None


async def test_sigkill_one_of_three_workers_loses_nothing(
    database_url: str, redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """Three workers share 20,000 events; one is SIGKILLed mid-run: every expected achievement
    exists exactly once, nothing stays pending, and every achievement is announced."""
    data = await seed_fleet(database_url, redis, settings, events=20_000)
    with workers(settings, 3, tmp_path) as procs:
        await wait_for(lambda: _at_least(redis, settings, 3000), 120, "the fleet to get going")
        procs[1].signal(signal.SIGKILL)
        killed_at = await acknowledged(redis, settings)
        assert procs[1].wait(10) == -signal.SIGKILL
        assert killed_at < data.events, "the worker was killed before the run ended"
        await finish(database_url, redis, settings, data, 180)
        for stream in settings.streams:  # whatever it held was claimed by the others
            assert await redis.xpending_range(stream, settings.group, "-", "+", 1, "w1") == []
        for survivor in (procs[0], procs[2]):
            assert survivor.proc.poll() is None, survivor.output()


async def test_sigterm_drains_and_exits_zero(
    database_url: str, redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """SIGTERM mid-run: the worker finishes its batch, exits 0, and leaves nothing pending."""
    data = await seed_fleet(database_url, redis, settings, events=8000)
    worker = WorkerProcess.start(settings, "w-term", tmp_path)
    try:
        await wait_for(lambda: _at_least(redis, settings, 800), 120, "the worker to get going")
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.stop()
    for stream in settings.streams:
        mine = await redis.xpending_range(stream, settings.group, "-", "+", 10, "w-term")
        assert mine == [], "a stopped worker left entries it had read unacknowledged"
    assert await acknowledged(redis, settings) < data.events, "it stopped before the end"
    await drain_with(settings, "w-rest", tmp_path)
    await finish(database_url, redis, settings, data, 30)


async def test_postgres_cut_off_and_restored(
    database_url: str, redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """With PostgreSQL cut off nothing is acknowledged; once restored the result is complete."""
    data = await seed_fleet(database_url, redis, settings, events=10_000)
    async with Proxy(postgres_target(database_url)) as proxy:
        proxied = msgspec.structs.replace(
            settings, database_url=via_proxy(database_url, proxy.port)
        )
        with workers(proxied, 2, tmp_path):
            await wait_for(lambda: _at_least(redis, settings, 1500), 120, "the fleet to start")
            proxy.cut()
            await asyncio.sleep(1.0)  # a batch committed just before the cut may still settle
            during = await acknowledged(redis, settings)
            await asyncio.sleep(3.0)
            assert await acknowledged(redis, settings) == during, "acknowledged while cut off"
            assert during < data.events, "the cut came before the end of the run"
            proxy.restore()
            await finish(database_url, redis, settings, data, 180)


async def test_redis_restarted_mid_run(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    """A Redis restart (AOF on) mid-run: workers reconnect, finish, and nothing is lost."""
    async with own_redis() as (url, restart):
        local = msgspec.structs.replace(settings, redis_url=url)
        client = aioredis.Redis.from_url(url)
        try:
            data = await seed_fleet(database_url, client, local, events=10_000)
            with workers(local, 2, tmp_path) as procs:
                await wait_for(lambda: _at_least(client, local, 1500), 120, "the fleet to start")
                await restart()
                await client.aclose()
                client = aioredis.Redis.from_url(url)
                await finish(database_url, client, local, data, 180)
                for p in procs:
                    assert p.proc.poll() is None, p.output()
        finally:
            await client.aclose()


async def drain_with(settings: Settings, consumer: str, tmp_path: Path) -> None:
    """Run `goalstream worker --burst` as `consumer` until the streams are drained."""
    rest = WorkerProcess.start(settings, consumer, tmp_path, "--burst")
    try:
        assert await asyncio.to_thread(rest.wait, 120) == 0, rest.output()
    finally:
        rest.stop()


async def _at_least(redis: aioredis.Redis, settings: Settings, n: int) -> bool:
    try:
        return await acknowledged(redis, settings) >= n
    except Exception:
        return False


async def test_sigterm_during_outage_exits_without_acknowledging(
    database_url: str, redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """Stopped while PostgreSQL is unreachable, a worker exits 0 at once and acknowledges
    nothing it could not commit; restarted, it processes what it held."""
    data = await seed_fleet(database_url, redis, settings, events=3000)
    async with Proxy(postgres_target(database_url)) as proxy:
        proxied = msgspec.structs.replace(
            settings, database_url=via_proxy(database_url, proxy.port)
        )
        worker = WorkerProcess.start(proxied, "w-out", tmp_path)
        try:
            await wait_for(lambda: _at_least(redis, settings, 300), 120, "the worker to start")
            proxy.cut()
            await asyncio.sleep(1.0)
            before = await acknowledged(redis, settings)
            held = 0
            for stream in settings.streams:
                held += len(
                    await redis.xpending_range(stream, settings.group, "-", "+", 10_000, "w-out")
                )
            worker.signal(signal.SIGTERM)
            # Wait in a thread: the proxy runs on this event loop and must keep refusing.
            assert await asyncio.to_thread(worker.wait, 20) == 0, worker.output()
        finally:
            worker.stop()
    assert held > 0, "the worker held read entries while cut off"
    assert await acknowledged(redis, settings) == before
    # The same worker, restarted (as an orchestrator would): it takes back what it held.
    await drain_with(settings, "w-out", tmp_path)
    await finish(database_url, redis, settings, data, 30)


async def test_sigterm_while_redis_is_cut_off_exits_promptly(
    database_url: str, redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """Stopped while Redis is unreachable (its batches committed but not acknowledged), a
    worker still exits 0 promptly; restarted, it finishes without writing anything twice."""
    data = await seed_fleet(database_url, redis, settings, events=3000)
    async with Proxy(redis_target(settings.redis_url)) as proxy:
        proxied = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        worker = WorkerProcess.start(proxied, "w-red", tmp_path)
        try:
            await wait_for(lambda: _at_least(redis, settings, 300), 120, "the worker to start")
            proxy.cut()
            await asyncio.sleep(1.0)
            worker.signal(signal.SIGTERM)
            assert await asyncio.to_thread(worker.wait, 20) == 0, worker.output()
        finally:
            worker.stop()
    await drain_with(settings, "w-red", tmp_path)
    await finish(database_url, redis, settings, data, 30)
