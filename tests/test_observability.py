"""What operators see: a running worker's /metrics, /healthz and /readyz, and its log lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog
from prometheus_client.parser import text_string_to_metric_families

from goalstream import constants
from goalstream import log as logsetup
from goalstream.health import serve_metrics
from goalstream.settings import Settings
from goalstream.worker import Worker
from tests.conftest import World

TAG = constants.TAG_ADDED
PAY = constants.PAYMENT_COMPLETED
APPT = constants.APPOINTMENT_BOOKED
FORM = constants.FORM_SUBMITTED

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET a path of the worker's HTTP server: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


async def scrape(port: int) -> Samples:
    """Every sample of /metrics, parsed as Prometheus parses the text format."""
    status, body = await asyncio.to_thread(http_get, port, "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of one series name, keyed by one label's value."""
    return {dict(labels)[label]: value for labels, value in samples.get(name, {}).items()}


def single(samples: Samples, name: str) -> float:
    """The value of a series without labels."""
    return samples[name][frozenset()]


Backlog = dict[str, tuple[float, float | None]]


def backlog_gauges(samples: Samples) -> Backlog:
    """Per stream, the worker's (pending, lag) gauges; lag None where it exports none."""
    pending = by_label(samples, "goalstream_consumer_pending", "stream")
    lag = by_label(samples, "goalstream_consumer_lag", "stream")
    return {s: (pending[s], lag.get(s)) for s in pending}


async def xinfo_backlog(redis: aioredis.Redis, settings: Settings) -> Backlog:
    """Per stream, the group's (pending, lag) as XINFO GROUPS reports them (Redis 6.2 has no
    lag: None)."""
    out: Backlog = {}
    for stream in settings.streams:
        for group in await redis.xinfo_groups(stream):
            if group["name"] in (settings.group, settings.group.encode()):
                lag = group.get("lag")
                out[stream] = (float(group["pending"]), None if lag is None else float(lag))
    return out


@pytest.fixture
def metrics_worker(settings: Settings) -> Iterator[tuple[Worker, int]]:
    """A worker (not started) whose metrics server listens on a free port of 127.0.0.1."""
    # Entries left pending by another consumer must stay pending for the whole test.
    worker = Worker(msgspec.structs.replace(settings, claim_idle_ms=3_600_000))
    server = serve_metrics(worker, 0, host="127.0.0.1")
    yield worker, server.server_address[1]
    server.shutdown()
    server.server_close()


async def known_batch(world: World) -> dict[str, str]:
    """Seed goals and send 6 entries: 4 valid (3 of them achieve a goal), 2 invalid."""
    wf = await world.workflow()
    await world.goal(wf, "tag_added", {"tag": "vip"})
    await world.goal(wf, "purchase_made", {}, mode="measure")
    await world.goal(wf, "form_submitted", {"form_id": "f1"}, mode="measure")
    contacts = [await world.contact() for _ in range(4)]
    for contact in contacts:
        await world.enroll(wf, contact)
    await world.send(TAG, contacts[0], {"tag": "vip"})
    await world.send(TAG, contacts[1], {"tag": "not-vip"})
    await world.send(PAY, contacts[2], {"amount": "10.00", "currency": "USD"})
    await world.send(FORM, contacts[3], {"form_id": "f1"})
    return {
        "malformed": await world.send_raw(TAG, b"{not json"),
        "negative": await world.send(PAY, contacts[2], {"amount": "-1", "currency": "USD"}),
    }


async def test_metrics_after_known_batch_match_counts_and_xinfo(
    world: World, metrics_worker: tuple[Worker, int]
) -> None:
    """After a known batch, /metrics has every counter at its expected value and pending/lag
    gauges equal to XINFO GROUPS (with entries left pending by another consumer)."""
    worker, port = metrics_worker
    settings, redis = world.settings, world.redis
    for stream in settings.streams:
        await redis.xgroup_create(stream, settings.group, id="0", mkstream=True)
    await known_batch(world)
    for _ in range(2):
        await world.send(APPT, uuid.uuid4(), {"calendar_id": "c"})
    # A consumer that read two entries and died: they stay pending, and the worker never sees them.
    await redis.xreadgroup(settings.group, "ghost", {world.stream(APPT): ">"}, count=10)

    assert await asyncio.to_thread(http_get, port, "/healthz") == (200, "ok\n")
    assert (await asyncio.to_thread(http_get, port, "/readyz"))[0] == 503
    task = asyncio.create_task(worker.run())
    try:
        samples, xinfo = await settled_metrics(worker, port, redis, settings, entries=6)
        assert await asyncio.to_thread(http_get, port, "/readyz") == (200, "ready\n")
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 30)

    assert {s: p for s, (p, _) in xinfo.items()} == {
        s: 2.0 if s == world.stream(APPT) else 0.0 for s in settings.streams
    }
    assert {lag for _, lag in xinfo.values()} <= {0.0, None}  # None: Redis 6.2 reports no lag
    assert backlog_gauges(samples) == xinfo
    received = {
        (dict(k)["stream"], dict(k)["type"]): v
        for k, v in samples["goal_events_received_total"].items()
    }
    assert received == {
        (world.stream(TAG), TAG): 2,
        (world.stream(TAG), "invalid"): 1,
        (world.stream(PAY), PAY): 1,
        (world.stream(PAY), "invalid"): 1,
        (world.stream(FORM), FORM): 1,
    }
    assert single(samples, "goal_evaluations_total") == 4
    assert by_label(samples, "goal_achievements_total", "goal_type") == {
        "tag_added": 1,
        "purchase_made": 1,
        "form_submitted": 1,
    }
    assert by_label(samples, "goalstream_dead_letters_total", "reason") == {
        "malformed_JSON": 1,
        "invalid_event": 1,
    }
    assert single(samples, "goal_listeners_active") == 3
    assert single(samples, "goalstream_announcements_total") == 3
    assert single(samples, "goalstream_enrollment_exits_total") == 1
    assert single(samples, "goalstream_end_to_end_latency_seconds_count") == 6
    assert single(samples, "goalstream_batch_size_sum") == 6
    batches = single(samples, "goalstream_batch_size_count")
    assert batches >= 1
    assert single(samples, "goal_evaluation_latency_seconds_count") == batches
    assert single(samples, "goalstream_ready") == 1
    assert len(await world.dead_letters()) == 2


async def settled_metrics(
    worker: Worker, port: int, redis: aioredis.Redis, settings: Settings, *, entries: int
) -> tuple[Samples, Backlog]:
    """Scrape until the worker has processed `entries` and its backlog gauges, which its
    housekeeping samples every few seconds, agree with XINFO (or 30 s pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        samples = await scrape(port)
        xinfo = await xinfo_backlog(redis, settings)
        settled = worker.processed == entries and backlog_gauges(samples) == xinfo
        if settled or loop.time() > deadline:
            return samples, xinfo
        await asyncio.sleep(0.2)


# -- logs ---------------------------------------------------------------------------------------


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `goalstream worker` process on this test's database and streams."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOALSTREAM_")}
    env.update(
        GOALSTREAM_REDIS_URL=settings.redis_url,
        GOALSTREAM_DATABASE_URL=settings.database_url,
        GOALSTREAM_STREAMS=",".join(settings.streams),
        GOALSTREAM_GROUP_START="0",
        GOALSTREAM_CONSUMER=settings.consumer,
        GOALSTREAM_ACHIEVED_STREAM=settings.achieved_stream,
        GOALSTREAM_DLQ_STREAM=settings.dlq_stream,
        GOALSTREAM_METRICS_PORT="0",
        GOALSTREAM_BLOCK_MS="100",
        **extra,
    )
    return env


async def run_worker_process(settings: Settings, **extra: str) -> list[str]:
    """Run `goalstream worker --burst` to the end; its stderr lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "goalstream.cli",
        "worker",
        "--burst",
        env=worker_env(settings, **extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    return stderr.decode().splitlines()


@pytest.mark.e2e
async def test_worker_logs_json_with_entry_context_and_no_line_per_event(world: World) -> None:
    """A worker process logs JSON lines; the line about a dead-lettered entry carries its stream,
    entry id and batch id, and 40 valid events at INFO log no line of their own."""
    wf = await world.workflow()
    await world.goal(wf, "tag_added", {"tag": "vip"}, mode="measure")
    contact = await world.contact()
    await world.enroll(wf, contact)
    for i in range(40):
        await world.send(TAG, contact, {"tag": "vip" if i % 2 else "other"})
    bad = await world.send(PAY, contact, {"amount": "-1", "currency": "USD"})

    lines = await run_worker_process(
        world.settings, GOALSTREAM_LOG_FORMAT="json", GOALSTREAM_LOG_LEVEL="INFO"
    )

    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"event", "level", "timestamp"} <= r.keys() for r in records)
    about_entries = [r for r in records if "entry_id" in r]
    assert len(about_entries) == 1
    line = about_entries[0]
    assert line["event"] == "entry dead-lettered"
    assert line["level"] == "warning"
    assert (line["stream"], line["entry_id"]) == (world.stream(PAY), bad)
    assert re.fullmatch(r"[0-9a-f]{12}", line["batch_id"])
    assert line["reason"].startswith("invalid event")
    assert len(records) < 20, [r["event"] for r in records]
    assert {r["event"] for r in records} >= {"worker started", "worker stopped"}


@pytest.fixture
def captured_stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """structlog as `goalstream.log.configure` sets it up, writing into pytest's capture; reset
    after the test so other tests keep structlog's defaults."""
    yield capsys
    structlog.reset_defaults()


@contextlib.asynccontextmanager
async def json_logs(capsys: pytest.CaptureFixture[str]) -> AsyncIterator[list[dict[str, Any]]]:
    """Configure JSON logs at INFO; on exit, fill the yielded list with the lines written."""
    logsetup.configure("json", "INFO")
    capsys.readouterr()
    records: list[dict[str, Any]] = []
    yield records
    records += [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]


async def test_dead_letter_line_names_the_entrys_tenant(
    world: World, captured_stderr: pytest.CaptureFixture[str]
) -> None:
    """The line about a dead-lettered entry names the tenant its envelope gives, and none when
    the entry has no readable tenant."""
    contact = await world.contact()
    bad = await world.send(PAY, contact, {"amount": "-1", "currency": "USD"})
    malformed = await world.send_raw(TAG, b"{not json")
    async with json_logs(captured_stderr) as records:
        await world.run_worker()
    lines = {
        (r["stream"], r["entry_id"]): r for r in records if r.get("event") == "entry dead-lettered"
    }
    bad_key, malformed_key = (world.stream(PAY), bad), (world.stream(TAG), malformed)
    assert set(lines) == {bad_key, malformed_key}
    assert lines[bad_key]["tenant_id"] == str(world.tenant_id)
    assert lines[malformed_key].get("tenant_id") is None


def test_console_format_is_readable_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    """GOALSTREAM_LOG_FORMAT=console renders key=value text with the bound fields, not JSON."""
    try:
        logsetup.configure("console", "INFO")
        structlog.get_logger("t").bind(batch_id="abc123").warning("entry dead-lettered", n=1)
        structlog.get_logger("t").debug("hidden at INFO")
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
    lines = err.splitlines()
    assert len(lines) == 1
    assert "entry dead-lettered" in lines[0]
    assert "batch_id=abc123" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
