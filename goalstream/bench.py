"""`goalstream bench`: goalstream against the Redis ceiling and the SPEC's naive design, in one run.

The bench makes a database and stream keys of its own, seeds tenants, workflows, goals, contacts,
enrolments and pending actions with set-based SQL, preloads the events once, and then drains
them three times, each with a consumer group of its own and the same number of processes:

- ceiling: XREADGROUP, msgspec decode and XACK, nothing else;
- goalstream: the real `Worker` (burst mode), end to end;
- naive: the SPEC's `handle_event` (`goalstream.naive`), per event.

Between the two runs that write, the database is put back as it was, and each run's achievements
are checked against the set the generated events must produce. `--latency` instead paces a
producer at a fixed rate against running workers and reports entry-id-to-commit percentiles.

Ids are md5 hashes of small integers (`md5('gsb:c:' || k)::uuid` in SQL, the same in Python), so
the event generator knows every row's id without reading the database back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import random
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg
import msgspec
import redis
import redis.asyncio as aioredis

from goalstream import constants
from goalstream import log as logsetup
from goalstream.cache import load_index
from goalstream.consumer import StreamConsumer
from goalstream.errors import ConfigError, GoalstreamError
from goalstream.events import Entry, EventDecoder, Invalid
from goalstream.metrics import Metrics
from goalstream.migrate import migrate
from goalstream.naive import NaiveSubscriber
from goalstream.settings import Settings
from goalstream.worker import Worker

# Goal type of goal j is GOAL_TYPES[j % 5]; its events go to the stream of EVENT_TYPES[j % 5].
GOAL_TYPES = (
    "tag_added",
    "purchase_made",
    "appointment_booked",
    "form_submitted",
    "pipeline_stage_reached",
)
EVENT_TYPES = (
    constants.TAG_ADDED,
    constants.PAYMENT_COMPLETED,
    constants.APPOINTMENT_BOOKED,
    constants.FORM_SUBMITTED,
    constants.PIPELINE_STAGE_CHANGED,
)
# Event data that no goal's criteria match (a "miss"), per event type.
MISS_DATA: tuple[dict[str, str], ...] = (
    {"tag": "newsletter"},
    {"amount": "5.00", "currency": "EUR", "product_id": "gift-card"},
    {"calendar_id": "walk-in"},
    {"form_id": "contact-us"},
    {"pipeline_id": "sales", "stage_id": "open"},
)
PREFIX_KINDS = {"tenant": "t", "workflow": "w", "goal": "g", "contact": "c", "enrollment": "e"}


class BenchError(GoalstreamError):
    """The benchmark could not run (a child process died, a drain never finished)."""


class BenchConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The sizes and knobs of one bench run; every field has a sensible default."""

    tenants: int = 10
    workflows: int = 0  # 0: one workflow per 5 goals
    goals: int = 10_000
    contacts: int = 50_000
    enrollments: int = 100_000
    pending_actions: int = 2
    events: int = 100_000
    candidate_rate: float = 0.1
    near_miss_rate: float = 0.0
    workers: int = 2
    batch_size: int = 100
    # The first run after seeding is cold (PostgreSQL pages first written since the seed's
    # checkpoint); the median of three is a warm run, like naive's, which comes after them.
    rounds: int = 3
    naive: bool = True
    latency: bool = False
    rate: float = 5000.0
    duration: float = 10.0
    seed: int = 1
    keep: bool = False

    @property
    def workflow_count(self) -> int:
        """Workflows to create: as asked, or one per five goals (a realistic handful each)."""
        return self.workflows or max(self.tenants, self.goals // 5)

    def check(self) -> None:
        """Refuse sizes the data layout cannot honour, naming the flag."""
        w, t = self.workflow_count, self.tenants
        if min(t, self.contacts, self.enrollments, self.events, self.workers) < 1:
            raise ConfigError("--tenants, --contacts, --enrollments, --events, --workers >= 1")
        if w < t or self.goals < w:
            raise ConfigError("need --tenants <= --workflows <= --goals")
        if -(-self.enrollments // self.contacts) > w // t:
            raise ConfigError("more enrollments per contact than workflows per tenant")
        if not 0 <= self.candidate_rate <= 1 or not 0 <= self.near_miss_rate <= 1:
            raise ConfigError("--candidate-rate and --near-miss-rate must be within [0, 1]")
        if self.rate <= 0 or self.duration <= 0 or self.rounds < 1 or self.pending_actions < 0:
            raise ConfigError("--rate, --duration, --rounds must be positive")


# -- the data layout: integers shared by the SQL seed and the event generator -----------------


def uid(kind: str, n: int) -> uuid.UUID:
    """The id of row n of a kind, as the seed SQL computes it."""
    return uuid.UUID(hashlib.md5(f"gsb:{PREFIX_KINDS[kind]}:{n}".encode()).hexdigest())


class Layout:
    """Who belongs to whom: contact k and workflow w are of tenant k % T and w % T; goal j is
    of workflow j % W; enrolment e is contact e % C's (e // C)-th, in a workflow of its tenant."""

    def __init__(self, config: BenchConfig) -> None:
        self.t = config.tenants
        self.w = config.workflow_count
        self.g = config.goals
        self.c = config.contacts
        self.e = config.enrollments

    def workflows_of_tenant(self, tenant: int) -> int:
        return (self.w - tenant + self.t - 1) // self.t

    def workflow_of_enrollment(self, e: int) -> int:
        k, j = e % self.c, e // self.c
        tenant = k % self.t
        return tenant + self.t * ((k // self.t + j) % self.workflows_of_tenant(tenant))

    def goal_of_enrollment(self, e: int) -> int:
        """The one goal the candidate events of enrolment e meet (so any order gives one set)."""
        w = self.workflow_of_enrollment(e)
        goals_of_workflow = (self.g - w + self.w - 1) // self.w
        return w + self.w * (e % goals_of_workflow)

    def workflows_of_contact(self, k: int) -> set[int]:
        count = 0 if k >= self.e else (self.e - 1 - k) // self.c + 1
        return {self.workflow_of_enrollment(k + j * self.c) for j in range(count)}


SEED_SQL = (
    """INSERT INTO tenants (id, name)
       SELECT md5('gsb:t:' || t)::uuid, 'bench-' || t FROM generate_series(0, $1::int - 1) t""",
    """INSERT INTO workflows (id, tenant_id, name)
       SELECT md5('gsb:w:' || w)::uuid, md5('gsb:t:' || (w % $1::int))::uuid, 'wf-' || w
       FROM generate_series(0, $2::int - 1) w""",
    """INSERT INTO contacts (id, tenant_id)
       SELECT md5('gsb:c:' || k)::uuid, md5('gsb:t:' || (k % $1::int))::uuid
       FROM generate_series(0, $2::int - 1) k""",
    """INSERT INTO workflow_goals (id, workflow_id, tenant_id, goal_type, criteria, mode)
       SELECT md5('gsb:g:' || j)::uuid, md5('gsb:w:' || (j % $2::int))::uuid,
              md5('gsb:t:' || ((j % $2::int) % $1::int))::uuid,
              ($4::text[])[j % 5 + 1]::goal_type,
              CASE j % 5
                WHEN 0 THEN jsonb_build_object('tag', 't' || j)
                WHEN 1 THEN jsonb_build_object('product_id', 'p' || j, 'currency', 'USD')
                WHEN 2 THEN jsonb_build_object('calendar_id', 'c' || j)
                WHEN 3 THEN jsonb_build_object('form_id', 'f' || j)
                ELSE jsonb_build_object('pipeline_id', 'pl' || j, 'stage_id', 'won') END,
              CASE WHEN (j / 5) % 5 = 0 THEN 'measure' ELSE 'exit' END
       FROM generate_series(0, $3::int - 1) j""",
    """INSERT INTO workflow_enrollments (id, tenant_id, workflow_id, contact_id, enrolled_at)
       SELECT md5('gsb:e:' || e)::uuid, md5('gsb:t:' || t)::uuid,
              md5('gsb:w:' || (t + $1::int * ((k / $1::int + j)
                                              % (($2::int - t + $1::int - 1) / $1::int))))::uuid,
              md5('gsb:c:' || k)::uuid, now() - interval '1 day'
       FROM generate_series(0, $4::int - 1) e,
            LATERAL (SELECT e % $3::int AS k, e / $3::int AS j) a,
            LATERAL (SELECT a.k % $1::int AS t) b""",
    """INSERT INTO workflow_pending_actions (tenant_id, enrollment_id, kind, run_at)
       SELECT md5('gsb:t:' || ((e % $2::int) % $1::int))::uuid, md5('gsb:e:' || e)::uuid,
              CASE WHEN a % 2 = 0 THEN 'action' ELSE 'wait' END, now() + interval '1 day'
       FROM generate_series(0, $3::int - 1) e, generate_series(0, $4::int - 1) a""",
)

RESET_SQL = (
    "TRUNCATE workflow_goal_achievements, goalstream_outbox",
    """UPDATE workflow_enrollments SET status = 'active', exit_reason = NULL, exited_at = NULL
       WHERE status = 'exited'""",
    """UPDATE workflow_pending_actions
          SET status = 'pending', cancel_reason = NULL, cancelled_at = NULL
        WHERE status = 'cancelled'""",
)

# Entry id time to the achievement's transaction, for every achievement written.
ACHIEVEMENT_LATENCY_SQL = """
SELECT extract(epoch FROM (metadata->>'recorded_at')::timestamptz) * 1000
       - split_part(metadata->>'entry_id', '-', 1)::bigint
FROM workflow_goal_achievements
"""


async def seed(dsn: str, config: BenchConfig) -> float:
    """Create every row with set-based SQL; return the seconds it took."""
    started = time.perf_counter()
    lay = Layout(config)
    conn = await asyncpg.connect(dsn)
    try:
        replica = await _replica_mode(conn)
        async with conn.transaction():
            if not replica:
                # Without replica mode the per-row goal notification would queue 1M notices.
                await conn.execute(
                    "ALTER TABLE workflow_goals DISABLE TRIGGER workflow_goals_notify"
                )
            tenants, workflows, contacts, goals, enrollments, actions = SEED_SQL
            await conn.execute(tenants, lay.t)
            await conn.execute(workflows, lay.t, lay.w)
            await conn.execute(contacts, lay.t, lay.c)
            await conn.execute(goals, lay.t, lay.w, lay.g, list(GOAL_TYPES))
            await conn.execute(enrollments, lay.t, lay.w, lay.c, lay.e)
            await conn.execute(actions, lay.t, lay.c, lay.e, config.pending_actions)
            if not replica:
                await conn.execute(
                    "ALTER TABLE workflow_goals ENABLE TRIGGER workflow_goals_notify"
                )
        if replica:
            await conn.execute("SET session_replication_role = DEFAULT")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def _replica_mode(conn: asyncpg.Connection) -> bool:
    """Skip triggers (foreign-key checks, goal notifications) while seeding, if allowed.

    The rows are consistent by construction; checking 4M foreign keys one row at a time would
    make seeding a million enrolments take minutes instead of seconds.
    """
    try:
        await conn.execute("SET session_replication_role = replica")
    except asyncpg.InsufficientPrivilegeError:
        return False
    return True


async def reset(dsn: str) -> None:
    """Put the database back as seeded: no achievements, every enrolment and action pending."""
    conn = await asyncpg.connect(dsn)
    try:
        for sql in RESET_SQL:
            await conn.execute(sql)
        await conn.execute("VACUUM ANALYZE workflow_enrollments, workflow_pending_actions")
    finally:
        await conn.close()


async def achievements_of_run(dsn: str) -> tuple[set[tuple[uuid.UUID, uuid.UUID]], list[float]]:
    """The (enrolment, goal) pairs written, and each one's entry-id-to-transaction time in ms."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT workflow_enrollment_id, goal_config_id FROM workflow_goal_achievements"
        )
        latencies = [float(r[0]) for r in await conn.fetch(ACHIEVEMENT_LATENCY_SQL)]
    finally:
        await conn.close()
    return {(r[0], r[1]) for r in rows}, latencies


# -- events -----------------------------------------------------------------------------------


class EventSet(msgspec.Struct):
    """The generated events, (stream suffix, JSON) in order, and the achievements they imply."""

    events: list[tuple[str, bytes]]
    candidates: int
    near_misses: int
    expected: set[tuple[uuid.UUID, uuid.UUID]]


def candidate_data(j: int) -> dict[str, str]:
    """Event data that meets goal j's criteria, and no other goal's."""
    kind = j % 5
    if kind == 0:
        return {"tag": f"T{j}"}  # upper case: tags match case-insensitively
    if kind == 1:
        return {"amount": "49.90", "currency": "USD", "product_id": f"p{j}"}
    if kind == 2:
        return {"calendar_id": f"c{j}", "service_id": "consult"}
    if kind == 3:
        return {"form_id": f"f{j}"}
    return {"pipeline_id": f"pl{j}", "stage_id": "won", "previous_stage_id": "open"}


def generate_events(config: BenchConfig, count: int | None = None) -> EventSet:
    """`count` events: a `candidate_rate` share meets a goal of one of the contact's active
    enrolments; of the rest, a `near_miss_rate` share meets some goal of a workflow the contact
    is not in (so it reaches SQL and finds nothing), and the others meet no goal at all."""
    lay = Layout(config)
    rng = random.Random(config.seed)
    tenant_ids = [str(uid("tenant", t)) for t in range(lay.t)]
    out = EventSet([], 0, 0, set())
    for i in range(config.events if count is None else count):
        kind, k, data = _one_event(lay, rng, config, out)
        envelope = {
            "id": f"bench-{i}",
            "type": EVENT_TYPES[kind],
            "tenant_id": tenant_ids[k % lay.t],
            "contact_id": str(uid("contact", k)),
            "data": data,
        }
        out.events.append((EVENT_TYPES[kind], msgspec.json.encode(envelope)))
    return out


def _one_event(
    lay: Layout, rng: random.Random, config: BenchConfig, out: EventSet
) -> tuple[int, int, dict[str, str]]:
    """(event type index, contact, data) of one event; records what it must achieve."""
    if rng.random() < config.candidate_rate:
        e = rng.randrange(lay.e)
        j = lay.goal_of_enrollment(e)
        out.candidates += 1
        out.expected.add((uid("enrollment", e), uid("goal", j)))
        return j % 5, e % lay.c, candidate_data(j)
    if rng.random() < config.near_miss_rate:
        j = rng.randrange(lay.g)
        w = j % lay.w
        for _ in range(20):
            k = w % lay.t + lay.t * rng.randrange(-(-(lay.c - w % lay.t) // lay.t))
            if k < lay.c and w not in lay.workflows_of_contact(k):
                out.near_misses += 1
                return j % 5, k, candidate_data(j)
    kind = rng.randrange(5)
    return kind, rng.randrange(lay.c), MISS_DATA[kind]


def preload(client: redis.Redis, prefix: str, events: Sequence[tuple[str, bytes]]) -> float:
    """XADD every event, pipelined; return the seconds it took."""
    started = time.perf_counter()
    for chunk in _chunks(events, 1000):
        pipe = client.pipeline(transaction=False)
        for event_type, body in chunk:
            pipe.xadd(prefix + event_type, {"data": body})
        pipe.execute()
    return time.perf_counter() - started


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- child processes --------------------------------------------------------------------------


class ChildResult(msgspec.Struct, kw_only=True):
    """What one measured process reports back."""

    kind: str
    index: int
    processed: int = 0
    last: float = 0.0  # wall-clock time its last batch was settled
    cpu_start: float = 0.0  # process CPU time when the gate opened
    cpu_seconds: float = 0.0  # process CPU time from the gate to the last batch
    latencies_ms: list[float] = []
    entry_ms: list[int] = []  # each latency's entry id time, for the per-second series
    # The worker's own end-to-end histogram (entry id to commit): (upper bound, count).
    commit_buckets: list[tuple[float, float]] = []
    rss_mb: float = 0.0  # after start-up, with the goal cache loaded
    peak_rss_mb: float = 0.0
    cache_load_seconds: float = 0.0
    goals: int = 0
    error: str = ""


Gate = Callable[[], Awaitable[None]]


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident (or, with VmHWM, peak resident) memory in MB."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TimedConsumer(StreamConsumer):
    """The real consumer, counting what it settles: settling is the XACK after the commit."""

    def __init__(
        self, client: aioredis.Redis, settings: Settings, result: ChildResult, latency: bool
    ) -> None:
        super().__init__(client, settings)
        self.result = result
        self.record_latency = latency

    async def settle(
        self, entries: Sequence[Entry], dead: Sequence[Invalid], announcements: Sequence[Any]
    ) -> bool:
        settled = await super().settle(entries, dead, announcements)
        now = time.time()
        if self.record_latency:
            now_ms = now * 1000
            millis = [e.millis for e in entries]
            self.result.entry_ms.extend(millis)
            self.result.latencies_ms.extend(now_ms - m for m in millis)
        self.result.processed += len(entries)
        self.result.last = now
        self.result.cpu_seconds = time.process_time() - self.result.cpu_start
        return settled


class BenchWorker(Worker):
    """The real worker, with a timed consumer, waiting at the gate once started."""

    def __init__(self, settings: Settings, gate: Gate, result: ChildResult, burst: bool) -> None:
        super().__init__(settings, Metrics())
        self.consumer = TimedConsumer(self.redis, settings, result, latency=not burst)
        self._gate = gate
        self.result = result

    async def start(self) -> None:
        await super().start()
        self.result.rss_mb = _rss_mb()
        self.result.cache_load_seconds = self.cache.last_load_seconds
        self.result.goals = len(self.cache.index)
        await self._gate()


async def _run_goalstream(settings: Settings, gate: Gate, result: ChildResult, burst: bool) -> None:
    worker = BenchWorker(settings, gate, result, burst)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop.set)
    await worker.run(burst=burst)
    result.commit_buckets = histogram_buckets(worker.metrics.end_to_end_latency)


def histogram_buckets(histogram: Any) -> list[tuple[float, float]]:
    """A prometheus histogram's cumulative buckets as (upper bound in ms, count)."""
    return [
        (float(sample.labels["le"]) * 1000, sample.value)
        for metric in histogram.collect()
        for sample in metric.samples
        if sample.name.endswith("_bucket")
    ]


async def _drain(
    consumer: StreamConsumer, handle: Callable[[list[Entry]], Awaitable[None]]
) -> None:
    """Read batches until the streams are drained (burst mode, as the worker does)."""
    while True:
        entries = await consumer.read(None)
        if entries:
            await handle(entries)
        elif consumer.caught_up:
            return


async def _run_ceiling(settings: Settings, gate: Gate, result: ChildResult, burst: bool) -> None:
    client: aioredis.Redis = aioredis.Redis.from_url(settings.redis_url)
    consumer = TimedConsumer(client, settings, result, latency=False)
    decoder = EventDecoder()

    async def handle(entries: list[Entry]) -> None:
        decoder.decode_batch(entries)
        await consumer.settle(entries, (), ())

    try:
        await gate()
        await _drain(consumer, handle)
    finally:
        await client.aclose()


async def _run_naive(settings: Settings, gate: Gate, result: ChildResult, burst: bool) -> None:
    subscriber = NaiveSubscriber(settings)
    consumer = StreamConsumer(subscriber.redis, settings)

    async def handle(entries: list[Entry]) -> None:
        for entry in entries:
            await subscriber.handle_entry(entry)
        result.processed += len(entries)
        result.last = time.time()
        result.cpu_seconds = time.process_time() - result.cpu_start

    try:
        await subscriber.start()
        await gate()
        await _drain(consumer, handle)
    finally:
        await subscriber.close()


async def _run_cache(settings: Settings, gate: Gate, result: ChildResult, burst: bool) -> None:
    await gate()
    conn = await asyncpg.connect(settings.database_url)
    try:
        began = time.perf_counter()
        index = await load_index(conn)
        result.cache_load_seconds = time.perf_counter() - began
    finally:
        await conn.close()
    result.goals = len(index)
    result.rss_mb = _rss_mb()


RUNNERS: dict[str, Callable[[Settings, Gate, ChildResult, bool], Coroutine[Any, Any, None]]] = {
    "ceiling": _run_ceiling,
    "goalstream": _run_goalstream,
    "naive": _run_naive,
    "cache": _run_cache,
}


def child_main(kind: str, index: int, settings: Settings, burst: bool, queue: Any, go: Any) -> None:
    """Entry point of a measured process: run, then send the result back as msgpack."""
    logsetup.configure(settings.log_format, settings.log_level)
    result = ChildResult(kind=kind, index=index)

    async def gate() -> None:
        queue.put(("ready", index, b""))
        await asyncio.to_thread(go.wait)
        result.cpu_start = time.process_time()

    try:
        asyncio.run(RUNNERS[kind](settings, gate, result, burst))
    except BaseException as exc:  # reported to the parent, which fails the bench
        result.error = f"{type(exc).__name__}: {exc}"
    result.peak_rss_mb = _rss_mb("VmHWM")
    queue.put(("done", index, msgspec.msgpack.encode(result)))


class Children:
    """N measured processes of one kind, started together once all of them are ready."""

    def __init__(
        self,
        kind: str,
        settings: Sequence[Settings],
        *,
        burst: bool = True,
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.tick = tick
        ctx = multiprocessing.get_context("spawn")
        self.queue = ctx.Queue()
        self.go = ctx.Event()
        self.procs = [
            ctx.Process(
                target=child_main,
                args=(kind, i, s, burst, self.queue, self.go),
                name=f"bench-{kind}-{i}",
                daemon=True,
            )
            for i, s in enumerate(settings)
        ]
        self.started_at = 0.0

    def start(self) -> None:
        """Start every process, wait until all are ready, then open the gate at once."""
        for proc in self.procs:
            proc.start()
        ready = 0
        while ready < len(self.procs):
            what, _, payload = self._get()
            if what == "done":  # a child that failed before its gate
                raise BenchError(msgspec.msgpack.decode(payload, type=ChildResult).error)
            ready += 1
        self.tick()
        self.started_at = time.time()
        self.go.set()

    def stop(self) -> None:
        """SIGTERM every process: running workers finish their batch and exit."""
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    def results(self) -> list[ChildResult]:
        """Wait for every process's result; fail if one of them failed."""
        out = [
            msgspec.msgpack.decode(self._get()[2], type=ChildResult) for _ in range(len(self.procs))
        ]
        for proc in self.procs:
            proc.join(timeout=30)
        errors = [r.error for r in out if r.error]
        if errors:
            raise BenchError(f"a measured process failed: {errors[0]}")
        return out

    def _get(self) -> tuple[str, int, bytes]:
        while True:
            with contextlib.suppress(Exception):
                message: tuple[str, int, bytes] = self.queue.get(timeout=0.2)
                return message
            self.tick()
            dead = [p for p in self.procs if p.exitcode not in (None, 0)]
            if dead:
                raise BenchError(f"{dead[0].name} died with exit code {dead[0].exitcode}")


class BackendCpu:
    """CPU time of the PostgreSQL backends serving one database, read from /proc.

    Only a server on this host can be seen; backends are found by their process title
    ("postgres: user db host idle") and re-sampled until they exit.
    """

    def __init__(self, database: str) -> None:
        self.tag = f" {database} ".encode()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def sample(self) -> None:
        """Read the CPU time of every backend of the database now."""
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    self._sample_one(entry.name)

    def _sample_one(self, pid: str) -> None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read(200)
            if not title.startswith(b"postgres:") or self.tag not in title:
                return
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return
        seconds = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        self.first.setdefault(pid, seconds)
        self.last[pid] = seconds

    def seconds(self) -> float | None:
        """CPU seconds used since each backend was first seen; None if none was seen."""
        if not self.last:
            return None
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def redis_cpu_seconds(client: redis.Redis) -> float:
    """The Redis server's own CPU time (all its clients: others' load shows up here too)."""
    info: dict[str, Any] = client.info("cpu")
    return float(info.get("used_cpu_sys", 0)) + float(info.get("used_cpu_user", 0))


def cpu_per_event(
    results: Sequence[ChildResult], postgres: float | None, redis_server: float, events: int
) -> dict[str, float | None]:
    """CPU microseconds per event: the measured processes, their backends, the Redis server."""
    n = max(1, events)
    processes = sum(r.cpu_seconds for r in results) * 1e6 / n
    pg = None if postgres is None else postgres * 1e6 / n
    rs = redis_server * 1e6 / n
    return {
        "processes": round(processes, 1),
        "postgres": None if pg is None else round(pg, 1),
        "redis_server": round(rs, 1),
        "total": round(processes + (pg or 0.0) + rs, 1),
    }


# -- measurements -----------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and max of `values` (nearest rank), rounded to 0.1; zeros when empty."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))], 1)

    return {"p50": rank(0.5), "p95": rank(0.95), "p99": rank(0.99), "max": round(ordered[-1], 1)}


def bucket_percentiles(buckets: Sequence[tuple[float, float]]) -> dict[str, float]:
    """p50, p95, p99 from cumulative histogram buckets, interpolated linearly within a bucket,
    and the share of observations at or under 50 ms (a bucket bound, so exact)."""
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    bounds = sorted(merged)
    total = merged[bounds[-1]] if bounds else 0.0
    out: dict[str, float] = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        out[name] = round(_interpolate(bounds, merged, q * total), 1) if total else 0.0
    out["share_le_50ms"] = round(merged.get(50.0, 0.0) / total, 4) if total else 0.0
    return out


def _interpolate(bounds: list[float], cumulative: dict[float, float], rank: float) -> float:
    lower, below = 0.0, 0.0
    for bound in bounds:
        if cumulative[bound] >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative[bound]
    return lower


def steady_state(
    entry_ms: Sequence[int], latencies: Sequence[float], warmup_ms: int
) -> list[float]:
    """The latencies of entries added after the first `warmup_ms` of the run."""
    if not entry_ms:
        return []
    cutoff = min(entry_ms) + warmup_ms
    return [x for at, x in zip(entry_ms, latencies, strict=True) if at >= cutoff]


def p99_by_second(entry_ms: Sequence[int], latencies: Sequence[float]) -> list[float]:
    """The p99 latency of the entries added in each second of the run, in order."""
    if not entry_ms:
        return []
    start = min(entry_ms)
    seconds: dict[int, list[float]] = {}
    for at, latency in zip(entry_ms, latencies, strict=True):
        seconds.setdefault((at - start) // 1000, []).append(latency)
    return [percentiles(seconds[s])["p99"] for s in sorted(seconds)]


class Bench:
    """One bench run: its database, its stream keys, its settings and its results."""

    def __init__(self, settings: Settings, config: BenchConfig) -> None:
        self.config = config
        self.prefix = f"gsbench{os.getpid()}:"
        self.admin_dsn = settings.database_url
        self.database = f"goalstream_bench_{os.getpid()}"
        self.dsn = with_database(settings.database_url, self.database)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.base = Settings(
            redis_url=settings.redis_url,
            database_url=self.dsn,
            streams=tuple(self.prefix + s for s in constants.DEFAULT_STREAMS),
            group_start="0",
            consumer=self.prefix + "bench",
            batch_size=config.batch_size,
            block_ms=200,
            achieved_stream=self.prefix + constants.ACHIEVED_STREAM,
            dlq_stream=self.prefix + constants.DLQ_STREAM,
            metrics_port=0,
            log_format=settings.log_format,
            log_level="WARNING",
            cache_refresh_seconds=3600.0,
        )
        self.report: dict[str, Any] = {}

    # -- set-up and tear-down ------------------------------------------------------------------

    def setup(self) -> EventSet:
        """Fresh database, seeded; events generated and (unless --latency) preloaded."""
        asyncio.run(drop_database(self.admin_dsn, self.dsn))
        asyncio.run(migrate(self.dsn))
        seed_seconds = asyncio.run(seed(self.dsn, self.config))
        count = round(self.config.rate * self.config.duration) if self.config.latency else None
        events = generate_events(self.config, count)
        preload_seconds = (
            0.0 if self.config.latency else preload(self.redis, self.prefix, events.events)
        )
        self.report["setup"] = {
            "seed_seconds": round(seed_seconds, 2),
            "preload_seconds": round(preload_seconds, 2),
            "workflows": self.config.workflow_count,
            "events": len(events.events),
            "candidates": events.candidates,
            "near_misses": events.near_misses,
            "expected_achievements": len(events.expected),
        }
        return events

    def cleanup(self) -> None:
        """Drop the database and the stream keys (unless --keep)."""
        if self.config.keep:
            print(f"kept database {self.dsn} and keys {self.prefix}*", file=sys.stderr)
            return
        keys = list(self.redis.scan_iter(match=self.prefix + "*", count=1000))
        if keys:
            self.redis.delete(*keys)
        asyncio.run(drop_database(self.admin_dsn, self.dsn))

    def _settings_for(self, kind: str, group: str) -> list[Settings]:
        for stream in self.base.streams:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        return [
            msgspec.structs.replace(self.base, group=group, consumer=f"{self.prefix}{kind}-{i}")
            for i in range(self.config.workers)
        ]

    # -- measurements ---------------------------------------------------------------------------

    def measure_cache(self) -> None:
        """Load the goal cache alone in a fresh process: seconds and resident memory."""
        children = Children("cache", [self.base])
        children.start()
        (result,) = children.results()
        self.report["cache"] = {
            "goals": result.goals,
            "load_seconds": round(result.cache_load_seconds, 2),
            "rss_mb": round(result.rss_mb, 1),
            "peak_rss_mb": round(result.peak_rss_mb, 1),
        }

    def drain(self, kind: str, round_no: int) -> dict[str, Any]:
        """Drain the preloaded events once with N processes of `kind`; the figures."""
        backends = BackendCpu(self.database)
        settings = self._settings_for(kind, f"bench-{kind}-{round_no}")
        children = Children(kind, settings, tick=backends.sample)
        children.start()
        redis_before = redis_cpu_seconds(self.redis)
        results = children.results()
        redis_used = redis_cpu_seconds(self.redis) - redis_before
        processed = sum(r.processed for r in results)
        seconds = max(r.last for r in results) - children.started_at
        figures: dict[str, Any] = {
            "events": processed,
            "seconds": round(seconds, 3),
            "events_per_s": round(processed / seconds) if seconds > 0 else 0,
            "cpu_us_per_event": cpu_per_event(results, backends.seconds(), redis_used, processed),
        }
        if kind == "goalstream":
            self._worker_memory(results)
        return figures

    def _worker_memory(self, results: list[ChildResult]) -> None:
        cache = self.report.setdefault("cache", {})
        cache["worker_load_seconds"] = round(max(r.cache_load_seconds for r in results), 2)
        cache["worker_rss_mb"] = round(max(r.rss_mb for r in results), 1)
        cache["worker_peak_rss_mb"] = round(max(r.peak_rss_mb for r in results), 1)

    def written(self, figures: dict[str, Any], expected: set[tuple[uuid.UUID, uuid.UUID]]) -> bool:
        """Add the run's achievements to its figures, reset the database; True if as expected."""
        pairs, latencies = asyncio.run(achievements_of_run(self.dsn))
        figures["achievements"] = len(pairs)
        seconds = figures["seconds"]
        figures["achievements_per_s"] = round(len(pairs) / seconds) if seconds > 0 else 0
        # Preloaded events wait in the backlog: entry id to commit, queueing included; the
        # latency under load is what `--latency` measures.
        figures["queued_e2e_ms"] = percentiles(latencies)
        asyncio.run(reset(self.dsn))
        return pairs == expected

    def throughput(self, events: EventSet) -> None:
        """Ceiling and goalstream `rounds` times (medians reported), then naive once."""
        rounds: list[dict[str, Any]] = []
        correct = True
        for round_no in range(self.config.rounds):
            one = {"ceiling": self.drain("ceiling", round_no)}
            one["goalstream"] = self.drain("goalstream", round_no)
            correct &= self.written(one["goalstream"], events.expected)
            rounds.append(one)
        for kind in ("ceiling", "goalstream"):
            self.report[kind] = _median_round([r[kind] for r in rounds])
        self.report["rounds"] = rounds
        naive_correct = None
        if self.config.naive:
            # One run: at ~70 s it averages the noise out by itself.
            self.report["naive"] = self.drain("naive", 0)
            naive_correct = self.written(self.report["naive"], events.expected)
        self._ratios()
        self.report["check"] = {
            "expected_achievements": len(events.expected),
            "goalstream_correct": correct,
            "naive_correct": naive_correct,
            "same_achievements": correct and naive_correct is not False,
        }

    def _ratios(self) -> None:
        gs = self.report["goalstream"]["events_per_s"]
        ratios = {"goalstream_over_ceiling": round(gs / self.report["ceiling"]["events_per_s"], 3)}
        if "naive" in self.report:
            ratios["goalstream_over_naive"] = round(
                gs / max(1, self.report["naive"]["events_per_s"]), 1
            )
        self.report["ratios"] = ratios

    def latency(self, events: EventSet) -> None:
        """Workers running, a producer paced at `rate`: entry id to commit, per entry."""
        children = Children(
            "goalstream", self._settings_for("goalstream", "bench-latency"), burst=False
        )
        children.start()
        try:
            produced_seconds = self._produce(events.events)
            self._wait_drained("bench-latency")
        finally:
            children.stop()
        results = children.results()
        self._worker_memory(results)
        latencies = [x for r in results for x in r.latencies_ms]
        entry_ms = [x for r in results for x in r.entry_ms]
        pairs, commit_latencies = asyncio.run(achievements_of_run(self.dsn))
        self.report["latency"] = {
            "rate_target": self.config.rate,
            "rate_achieved": round(len(events.events) / produced_seconds),
            "events": sum(r.processed for r in results),
            "achievements": len(pairs),
            # Entry id time to the XACK after the commit, exact: after the first second (fresh
            # backends plan the statement and warm their caches then), and over every entry.
            "e2e_ms": percentiles(steady_state(entry_ms, latencies, warmup_ms=1000)),
            "e2e_ms_all": percentiles(latencies),
            # Entry id time to the commit, from the worker's own histogram (bucketed).
            "commit_e2e_ms": bucket_percentiles([b for r in results for b in r.commit_buckets]),
            # Entry id time to the start of the transaction that wrote each achievement.
            "achievement_e2e_ms": percentiles(commit_latencies),
            "p99_ms_by_second": p99_by_second(entry_ms, latencies),
        }
        self.report["check"] = {
            "expected_achievements": len(events.expected),
            "goalstream_correct": pairs == events.expected,
            "same_achievements": pairs == events.expected,
        }

    def _produce(self, events: Sequence[tuple[str, bytes]]) -> float:
        """XADD the events at `rate` per second, catching up in small pipelines if late."""
        rate, sent, total = self.config.rate, 0, len(events)
        started = time.perf_counter()
        while sent < total:
            due = min(total, int((time.perf_counter() - started) * rate) + 1)
            if due <= sent:
                time.sleep(0.0005)
                continue
            pipe = self.redis.pipeline(transaction=False)
            for event_type, body in events[sent:due]:
                pipe.xadd(self.prefix + event_type, {"data": body})
            pipe.execute()
            sent = due
        return time.perf_counter() - started

    def _wait_drained(self, group: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_group_done(self.redis, s, group) for s in self.base.streams):
                return
            time.sleep(0.05)
        raise BenchError(f"group {group} did not drain within {timeout:.0f} s")


def _group_done(client: redis.Redis, stream: str, group: str) -> bool:
    for info in client.xinfo_groups(stream):
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return int(info["pending"]) == 0 and int(info.get("lag") or 0) == 0
    return False


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median events/s (the whole run, so its figures stay consistent)."""
    ordered = sorted(runs, key=lambda r: float(r["events_per_s"]))
    return ordered[(len(ordered) - 1) // 2]


# -- databases --------------------------------------------------------------------------------


def with_database(dsn: str, name: str) -> str:
    """The same server, another database."""
    return urlunparse(urlparse(dsn)._replace(path="/" + name))


async def drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop the bench's database if it is there."""
    name = urlparse(dsn).path.lstrip("/")
    admin = await asyncpg.connect(admin_dsn, database="postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def server_versions(dsn: str, client: redis.Redis) -> dict[str, str]:
    """PostgreSQL's and Redis's versions, for the report."""
    conn = await asyncpg.connect(dsn)
    try:
        pg = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    info: dict[str, Any] = client.info("server")
    return {"postgres": pg, "redis": str(info.get("redis_version", "?"))}


# -- the command ------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace, settings: Settings) -> BenchConfig:
    """A checked config from parsed flags; flags left unset keep their defaults."""
    fields = {f: getattr(args, f, None) for f in BenchConfig.__struct_fields__}
    fields["batch_size"] = settings.batch_size  # the flag, else GOALSTREAM_BATCH_SIZE
    config = BenchConfig(**{k: v for k, v in fields.items() if v is not None})
    config.check()
    return config


def run(settings: Settings, config: BenchConfig) -> dict[str, Any]:
    """Run the whole bench; return the report."""
    bench = Bench(settings, config)
    bench.report["command"] = "goalstream " + " ".join(sys.argv[1:])
    bench.report["config"] = msgspec.to_builtins(config) | {"workflows": config.workflow_count}
    try:
        events = bench.setup()
        bench.report["machine"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        } | asyncio.run(server_versions(bench.dsn, bench.redis))
        bench.measure_cache()
        if config.latency:
            bench.latency(events)
        else:
            bench.throughput(events)
    finally:
        bench.cleanup()
        bench.redis.close()
    return bench.report


def render(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    lines: list[str] = []
    cache = report.get("cache", {})
    if "latency" in report:
        lat = report["latency"]
        e2e = lat["e2e_ms"]
        commit = lat["commit_e2e_ms"]
        lines += [
            "| rate target | rate achieved | events | p50 ms | p95 ms | p99 ms | max ms "
            "(after the 1st s) | to commit p99 ms (worker histogram) | to commit ≤ 50 ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {lat['rate_target']:,.0f} | {lat['rate_achieved']:,} | {lat['events']:,} "
            f"| {e2e['p50']} | {e2e['p95']} | {e2e['p99']} | {e2e['max']} "
            f"| {commit['p99']} | {commit['share_le_50ms']:.2%} |",
            "",
            f"p99 ms by second: {lat['p99_ms_by_second']}; over every entry, warm-up included: "
            f"{lat['e2e_ms_all']}",
        ]
    else:
        lines += [
            "| run | events | seconds | events/s | achievements | achievements/s | vs ceiling "
            "| CPU µs/event: processes + postgres + redis = total |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        top = report["ceiling"]["events_per_s"]
        for kind in ("ceiling", "goalstream", "naive"):
            if kind in report:
                lines.append(_row(kind, report[kind], top))
        ratios = report["ratios"]
        lines.append("")
        lines.append(
            f"goalstream/ceiling {ratios['goalstream_over_ceiling']:.0%}"
            + (
                f", goalstream/naive {ratios['goalstream_over_naive']}x"
                if "goalstream_over_naive" in ratios
                else ""
            )
        )
    lines.append(
        f"goal cache: {cache.get('goals', 0):,} goals loaded in {cache.get('load_seconds')} s "
        f"(alone; {cache.get('worker_load_seconds')} s in each of the workers at once), "
        f"worker RSS {cache.get('worker_rss_mb')} MB after start, "
        f"peak {cache.get('worker_peak_rss_mb')} MB"
    )
    lines.append(f"check: {json.dumps(report['check'])}")
    return "\n".join(lines)


def _row(kind: str, r: dict[str, Any], top: float) -> str:
    ach = "- | -" if kind == "ceiling" else f"{r['achievements']:,} | {r['achievements_per_s']:,}"
    cpu = r["cpu_us_per_event"]
    pg = "?" if cpu["postgres"] is None else cpu["postgres"]
    return (
        f"| {kind} | {r['events']:,} | {r['seconds']} | {r['events_per_s']:,} | {ach} "
        f"| {r['events_per_s'] / top:.0%} "
        f"| {cpu['processes']} + {pg} + {cpu['redis_server']} = {cpu['total']} |"
    )


def main(args: argparse.Namespace, settings: Settings) -> int:
    """`goalstream bench`: run, print the tables, write the JSON; 1 if an answer was wrong."""
    config = config_from_args(args, settings)
    report = run(settings, config)
    print(render(report))
    if getattr(args, "json_path", None):
        with open(args.json_path, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
    return 0 if report["check"]["same_achievements"] else 1
