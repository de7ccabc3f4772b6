"""The `goalstream` command: one subcommand per job (CONTRACT 6)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import structlog

from goalstream import log as logsetup
from goalstream.errors import ConfigError, GoalstreamError
from goalstream.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]
# Exit status of a worker that had to stop without finishing its batch (second signal, deadline).
EXIT_FORCED = 3


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None)
        for key in (
            "redis_url",
            "database_url",
            "group",
            "consumer",
            "batch_size",
            "metrics_port",
            "admin_host",
            "admin_port",
            "log_format",
            "log_level",
        )
    }
    streams = getattr(args, "streams", None)
    if streams:
        overrides["streams"] = tuple(s.strip() for s in streams.split(",") if s.strip())
    return Settings.from_env(**overrides)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from goalstream.migrate import migrate

    applied = asyncio.run(migrate(settings.database_url))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from goalstream.metrics import Metrics
    from goalstream.worker import Worker

    async def main() -> None:
        metrics = Metrics(process=True)
        worker = Worker(settings, metrics)
        install_stop_signals(worker.stop, settings.shutdown_timeout_seconds)
        if settings.metrics_port:
            from goalstream.health import serve_metrics

            serve_metrics(worker, settings.metrics_port)
        await worker.run(burst=args.burst)

    asyncio.run(main())
    return 0


def install_stop_signals(stop: asyncio.Event, deadline_seconds: float) -> None:
    """SIGTERM/SIGINT: stop reading and drain; past the deadline, or on a second signal, exit.

    Exiting hard is safe at any moment: nothing is acknowledged before it is committed.
    """
    loop = asyncio.get_running_loop()
    logger = structlog.get_logger("goalstream")

    def hard_exit(reason: str) -> None:
        logger.warning("exiting without finishing the batch in hand", reason=reason)
        os._exit(EXIT_FORCED)

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            hard_exit(f"second {sig.name}")
        logger.info("stopping: finishing the batch in hand", signal=sig.name)
        stop.set()
        loop.call_later(deadline_seconds, hard_exit, "shutdown deadline passed")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from goalstream.events import encode_event

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--data is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--data must be a JSON object")
    occurred = datetime.fromisoformat(args.occurred_at) if args.occurred_at else None
    try:
        body = encode_event(
            args.type,
            event_id=args.id or uuid.uuid4().hex,
            tenant_id=uuid.UUID(args.tenant),
            contact_id=uuid.UUID(args.contact),
            data=data,
            occurred_at=occurred,
        )
    except ValueError as exc:  # msgspec.ValidationError is a ValueError
        raise ConfigError(str(exc)) from None
    stream = stream_for_type(settings, args.type)
    client = redis.Redis.from_url(settings.redis_url)
    entry_id: bytes = client.xadd(stream, {"data": body})  # type: ignore[assignment]
    print(f"{stream} {entry_id.decode()}")
    return 0


def stream_for_type(settings: Settings, event_type: str) -> str:
    """The configured stream an event type is published to: the one named after the type."""
    for stream in settings.streams:
        if stream == event_type or stream.endswith((":" + event_type, "." + event_type)):
            return stream
    return event_type


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from goalstream.bench import main as bench_main

    return bench_main(args, settings)


def cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    from goalstream.admin import serve

    serve(settings)
    return 0


def cmd_create_api_key(args: argparse.Namespace, settings: Settings) -> int:
    from goalstream.apikeys import create_api_key_command, revoke_api_key_command

    if args.revoke:
        revoked = asyncio.run(revoke_api_key_command(settings.database_url, args.revoke))
        print("revoked" if revoked else "no such live key")
        return 0 if revoked else 1
    key = asyncio.run(create_api_key_command(settings.database_url, args.tenant))
    print(f"API key for tenant {args.tenant} (shown once; only its SHA-256 is stored):")
    print(key)
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from goalstream.replay import parse_position, replay, terminal_progress

    try:
        start = parse_position(args.start, default="-")
        end = parse_position(args.end, default="+")
        tenant = uuid.UUID(args.tenant) if args.tenant else None
        workflow = uuid.UUID(args.workflow) if args.workflow else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    progress = terminal_progress() if sys.stderr.isatty() else None
    summary = asyncio.run(
        replay(
            settings,
            streams=[args.stream] if args.stream else None,
            start=start,
            end=end,
            tenant=tenant,
            workflow=workflow,
            dry_run=args.dry_run,
            progress=progress,
        )
    )
    if progress is not None:
        print(file=sys.stderr)
    verb = "would write" if args.dry_run else "wrote"
    print(
        f"replay {verb}: {summary.achievements} achievement(s), {summary.exits} exit(s), "
        f"{summary.cancelled_actions} cancelled action(s)"
    )
    print(
        f"read {summary.entries_read} entries ({summary.invalid} invalid, "
        f"{summary.skipped_other_tenant} of other tenants, {summary.matched_events} matching, "
        f"{summary.failed} refused by PostgreSQL) "
        f"in {summary.seconds:.1f}s"
    )
    return 0


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    import redis.asyncio as aioredis

    from goalstream.dlq import list_dead, requeue

    async def main() -> int:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            if args.action == "list":
                for item in await list_dead(client, settings, count=args.count):
                    print(json.dumps(item, ensure_ascii=False))
                return 0
            if not args.all and not args.id:
                raise ConfigError("requeue needs --id DLQ_ID (repeatable) or --all")
            try:
                moved = await requeue(client, settings, None if args.all else args.id)
            except KeyError as exc:
                raise ConfigError(str(exc.args[0])) from None
            for dlq_id, new_id in moved:
                print(f"requeued {dlq_id} -> {new_id}")
            print(f"{len(moved)} dead letter(s) requeued")
            return 0
        finally:
            await client.aclose()

    return asyncio.run(main())


def cmd_trim(args: argparse.Namespace, settings: Settings) -> int:
    import redis.asyncio as aioredis

    from goalstream.trim import trim

    if args.keep_days is None or args.keep_days < 0:
        raise ConfigError("--keep-days N (N >= 0) is required")

    async def main() -> dict[str, int]:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            streams = [*settings.streams, settings.achieved_stream, settings.dlq_stream]
            return await trim(client, streams, args.keep_days)
        finally:
            await client.aclose()

    for stream, removed in asyncio.run(main()).items():
        print(f"{stream}: {removed} entries removed")
    return 0


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from goalstream.dev import main as dev_main

    return dev_main(args, settings)


def _not_built(name: str) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        print(f"goalstream {name}: not built yet in this version", file=sys.stderr)
        return 2

    return handler


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="GOALSTREAM_REDIS_URL")
    p.add_argument("--database-url", help="GOALSTREAM_DATABASE_URL")
    p.add_argument("--streams", help="GOALSTREAM_STREAMS: comma-separated stream keys")
    p.add_argument("--group", help="GOALSTREAM_GROUP")
    p.add_argument("--log-format", choices=["json", "console"], help="GOALSTREAM_LOG_FORMAT")
    p.add_argument("--log-level", help="GOALSTREAM_LOG_LEVEL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goalstream",
        description="Goal tracking for workflow automation on Redis Streams and PostgreSQL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply unapplied SQL migrations")
    _common(p)
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("worker", help="consume the event streams until SIGTERM/SIGINT")
    _common(p)
    p.add_argument("--burst", action="store_true", help="drain what is there, then exit 0")
    p.add_argument("--consumer", help="GOALSTREAM_CONSUMER: this worker's name in the group")
    p.add_argument("--batch-size", type=int, help="GOALSTREAM_BATCH_SIZE")
    p.add_argument("--metrics-port", type=int, help="GOALSTREAM_METRICS_PORT (0: off)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("admin", help="serve the admin HTTP API")
    _common(p)
    p.add_argument("--host", dest="admin_host", help="GOALSTREAM_ADMIN_HOST")
    p.add_argument("--port", dest="admin_port", type=int, help="GOALSTREAM_ADMIN_PORT")
    p.set_defaults(handler=cmd_admin)

    p = sub.add_parser("replay", help="run a range of a stream through evaluation (backfill)")
    _common(p)
    p.add_argument("--stream", help="one stream key (default: every configured stream)")
    p.add_argument("--start", help="entry id, ms since the epoch, or RFC 3339 time (default: -)")
    p.add_argument("--end", help="entry id, ms since the epoch, or RFC 3339 time (default: +)")
    p.add_argument("--tenant", help="only this tenant's events and goals")
    p.add_argument("--workflow", help="only this workflow's goals")
    p.add_argument("--dry-run", action="store_true", help="report what would be written")
    p.add_argument("--batch-size", type=int, help="GOALSTREAM_BATCH_SIZE")
    p.set_defaults(handler=cmd_replay)

    p = sub.add_parser("publish", help="add one event to its stream")
    _common(p)
    p.add_argument("--type", required=True, help="event type, e.g. contact.tag.added")
    p.add_argument("--tenant", required=True, help="tenant UUID")
    p.add_argument("--contact", required=True, help="contact UUID")
    p.add_argument("--data", required=True, help='the event\'s data as JSON, e.g. {"tag": "vip"}')
    p.add_argument("--id", help="event id (default: a random one)")
    p.add_argument("--occurred-at", help="RFC 3339 time with offset (default: now)")
    p.set_defaults(handler=cmd_publish)

    p = sub.add_parser("create-api-key", help="print a new admin API key for a tenant")
    _common(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="tenant UUID: print a new key (as the last line)")
    who.add_argument("--revoke", metavar="KEY", help="revoke this key instead")
    p.set_defaults(handler=cmd_create_api_key)

    p = sub.add_parser("dlq", help="list and requeue dead-lettered entries")
    _common(p)
    p.add_argument("action", nargs="?", choices=["list", "requeue"], default="list")
    p.add_argument("--id", action="append", help="a dead letter's id (repeatable)")
    p.add_argument("--all", action="store_true", help="requeue every dead letter")
    p.add_argument("--count", type=int, default=100, help="how many to list")
    p.set_defaults(handler=cmd_dlq)

    p = sub.add_parser("trim", help="trim streams by age, never dropping unprocessed entries")
    _common(p)
    p.add_argument("--keep-days", type=float)
    p.set_defaults(handler=cmd_trim)

    p = sub.add_parser("bench", help="benchmark against the Redis ceiling and the naive design")
    _common(p)
    p.add_argument("--json", dest="json_path")
    # Unset flags take goalstream.bench.BenchConfig's defaults.
    for flag in ("tenants", "workflows", "goals", "contacts", "enrollments", "pending-actions"):
        p.add_argument(f"--{flag}", type=int, help="how many to create (workflows 0: goals/5)")
    p.add_argument("--events", type=int, help="events to preload")
    p.add_argument("--candidate-rate", type=float, help="share of events that achieve a goal")
    p.add_argument(
        "--near-miss-rate", type=float, help="share of the rest meeting a goal's criteria"
    )
    p.add_argument("--workers", type=int, help="processes per measurement")
    p.add_argument("--batch-size", type=int, help="GOALSTREAM_BATCH_SIZE")
    p.add_argument("--rounds", type=int, help="repeat each measurement; report the median")
    p.add_argument("--no-naive", dest="naive", action="store_false", default=None)
    p.add_argument("--latency", action="store_true", default=None, help="paced producer mode")
    p.add_argument("--rate", type=float, help="--latency: events/s (default 5000)")
    p.add_argument("--duration", type=float, help="--latency: seconds (default 10)")
    p.add_argument("--seed", type=int, help="random seed of the event generator")
    p.add_argument("--keep", action="store_true", default=None, help="keep the bench's data")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("dev", help="local stack on embedded or given servers, with a demo")
    _common(p)
    p.add_argument(
        "--demo-events", type=int, default=0, help="publish N demo events, then summarise"
    )
    p.add_argument(
        "--exit-after-demo", action="store_true", help="stop once the demo events are processed"
    )
    p.set_defaults(handler=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `goalstream` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"goalstream: {exc}", file=sys.stderr)
        return 2
    logsetup.configure(settings.log_format, settings.log_level)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except GoalstreamError as exc:
        structlog.get_logger("goalstream").error(str(exc))
        print(f"goalstream: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
