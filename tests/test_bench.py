"""`goalstream bench` at tiny sizes: every figure is reported, and both designs give one answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import redis

from goalstream import bench
from goalstream.events import event_data_type
from goalstream.goals import CRITERIA_TYPES, GoalType

pytestmark = pytest.mark.e2e

TINY = ["--tenants", "2", "--goals", "40", "--contacts", "60", "--enrollments", "120"]


def run_bench(tmp_path: Path, redis_url: str, pg_url: str, *flags: str) -> dict[str, Any]:
    """Run the real command in a process of its own; return its JSON report."""
    out = tmp_path / "bench.json"
    env = os.environ | {"GOALSTREAM_LOG_LEVEL": "WARNING", "GOALSTREAM_LOG_FORMAT": "console"}
    servers = ["--redis-url", redis_url, "--database-url", pg_url]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "goalstream.cli",
            "bench",
            *servers,
            "--json",
            str(out),
            *TINY,
            *flags,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    report: dict[str, Any] = json.loads(out.read_text())
    assert "check" in stdout  # the printed table
    report["pid"] = proc.pid
    return report


def assert_figures(section: dict[str, Any], *names: str) -> None:
    for name in names:
        value = section[name]
        if isinstance(value, dict):
            assert set(value) == {"p50", "p95", "p99", "max"}, name
        else:
            assert isinstance(value, int | float), name


async def leftovers(redis_url: str, pg_url: str, pid: int) -> tuple[list[bytes], list[str]]:
    """The stream keys and database a bench process left behind."""
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"gsbench{pid}:*"))
    client.close()
    conn = await asyncpg.connect(pg_url)
    try:
        dbs = [r[0] for r in await conn.fetch("SELECT datname FROM pg_database")]
    finally:
        await conn.close()
    return keys, [d for d in dbs if d == f"goalstream_bench_{pid}"]


async def test_bench_reports_every_figure_and_one_answer(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """The throughput run reports every figure, and goalstream's achievements equal naive's."""
    events = 600
    report = run_bench(
        tmp_path,
        redis_url,
        pg_url,
        *("--events", str(events), "--candidate-rate", "0.4", "--near-miss-rate", "0.5"),
        *("--rounds", "2"),
    )
    assert len(report["rounds"]) == 2
    for kind in ("ceiling", "goalstream", "naive"):
        assert report[kind]["events"] == events, kind
        assert_figures(report[kind], "seconds", "events_per_s")
        cpu = report[kind]["cpu_us_per_event"]
        assert cpu["processes"] > 0, kind
        assert_figures(cpu, "redis_server", "total")
    for kind in ("goalstream", "naive"):
        assert_figures(report[kind], "achievements", "achievements_per_s", "queued_e2e_ms")
    expected = report["setup"]["expected_achievements"]
    assert expected > 0
    assert report["goalstream"]["achievements"] == report["naive"]["achievements"] == expected
    assert report["check"]["same_achievements"] is True
    assert report["setup"]["near_misses"] > 0
    assert_figures(report["ratios"], "goalstream_over_ceiling", "goalstream_over_naive")
    assert_figures(
        report["cache"],
        *("goals", "load_seconds", "rss_mb", "worker_load_seconds", "worker_rss_mb"),
        "worker_peak_rss_mb",
    )
    assert report["cache"]["goals"] == 40
    assert await leftovers(redis_url, pg_url, report["pid"]) == ([], [])


async def test_bench_latency_mode_reports_percentiles(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """`--latency` paces a producer and reports entry-id-to-commit percentiles for every entry."""
    report = run_bench(tmp_path, redis_url, pg_url, "--latency", "--rate", "400", "--duration", "1")
    latency = report["latency"]
    assert latency["events"] == 400
    assert_figures(latency, "rate_target", "rate_achieved", "e2e_ms", "e2e_ms_all")
    assert_figures(latency, "achievement_e2e_ms")
    assert set(latency["commit_e2e_ms"]) == {"p50", "p95", "p99", "share_le_50ms"}
    assert latency["p99_ms_by_second"]
    assert latency["achievements"] == report["setup"]["expected_achievements"] > 0
    assert report["check"]["same_achievements"] is True
    assert_figures(report["cache"], "load_seconds", "worker_rss_mb")


async def test_seed_sql_and_event_generator_agree(database_url: str) -> None:
    """Rows seeded in SQL are where the generator thinks, and only candidates meet a goal."""
    config = bench.BenchConfig(tenants=3, goals=30, contacts=20, enrollments=50, events=300)
    await bench.seed(database_url, config)
    lay = bench.Layout(config)
    conn = await asyncpg.connect(database_url)
    try:
        enrolments = {
            r[0]: (r[1], r[2], r[3])
            for r in await conn.fetch(
                "SELECT id, workflow_id, contact_id, tenant_id FROM workflow_enrollments"
            )
        }
        goals = await conn.fetch(
            "SELECT id, workflow_id, goal_type::text, criteria::text FROM workflow_goals"
        )
        actions = await conn.fetchval("SELECT count(*) FROM workflow_pending_actions")
    finally:
        await conn.close()
    assert actions == 50 * config.pending_actions
    for e in range(config.enrollments):
        k = e % lay.c
        want = (
            bench.uid("workflow", lay.workflow_of_enrollment(e)),
            bench.uid("contact", k),
            bench.uid("tenant", k % lay.t),
        )
        assert enrolments[bench.uid("enrollment", e)] == want
    by_id = {row[0]: row for row in goals}
    for j in range(config.goals):
        _, workflow_id, goal_type, criteria = by_id[bench.uid("goal", j)]
        assert workflow_id == bench.uid("workflow", j % lay.w)
        parsed = msgspec.json.decode(criteria, type=CRITERIA_TYPES[GoalType(goal_type)])
        assert meets(parsed, j % 5, bench.candidate_data(j)), j
        assert not meets(parsed, j % 5, bench.MISS_DATA[j % 5]), j


def meets(criteria: Any, kind: int, data: dict[str, str]) -> bool:
    """Whether event data of type `kind` meets the criteria, as the worker decides it."""
    payload = msgspec.convert(data, event_data_type(bench.EVENT_TYPES[kind]))
    return bool(criteria.matches(payload))
