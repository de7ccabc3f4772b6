"""The admin API application: Litestar on uvicorn, with its lifespan, health and metrics routes.

OpenAPI: the document is served at `/schema/openapi.json` (and `/schema/openapi.yaml`), with
Swagger UI at `/schema/swagger` and ReDoc at `/schema/redoc`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
import structlog
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.openapi.spec import Components, SecurityScheme
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

import goalstream
from goalstream.admin.auth import ApiKeyAuthentication
from goalstream.admin.context import AdminContext
from goalstream.admin.db import create_pool
from goalstream.admin.observe import HttpMetrics, MetricsMiddleware
from goalstream.admin.routes import GoalController, field_in
from goalstream.admin.stats import (
    DEFAULT_RATE_WINDOW_SECONDS,
    RateLimiter,
    StatsCache,
)
from goalstream.settings import Settings

log = structlog.get_logger(__name__)

OPENAPI_PATH = "/schema"
# How long /readyz waits for each server before calling it down.
READY_TIMEOUT_SECONDS = 2.0

# Failures of a server, not of the request: answer 503 so clients retry, never 500.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    RedisError,
)


def _unavailable(request: Request[object, object, State], exc: Exception) -> Response[object]:
    log.warning("a server is unavailable", path=request.url.path, error=repr(exc))
    return Response(
        {"status_code": 503, "detail": "a backing server is unavailable; retry later"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _too_deep(request: Request[object, object, State], exc: Exception) -> Response[object]:
    # msgspec refuses JSON nested past Python's recursion limit by raising RecursionError.
    detail = "the request body is nested too deeply"
    return Response({"status_code": 400, "detail": detail}, status_code=400)


def _name_fields(request: Request[object, object, State], exc: Exception) -> Response[object]:
    """Litestar's body errors say `data`; name the field inside the body instead."""
    assert isinstance(exc, ValidationException)
    extra = exc.extra
    if isinstance(extra, list):
        extra = [_with_field(item) for item in extra]
    body = {"status_code": exc.status_code, "detail": exc.detail, "extra": extra}
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def _with_field(item: object) -> object:
    if isinstance(item, dict) and item.get("key") == "data":
        return {**item, "key": field_in(str(item.get("message", ""))) or "body"}
    return item


@get("/healthz", include_in_schema=False, media_type=MediaType.TEXT, sync_to_thread=False)
def healthz() -> str:
    """Alive: the process answers."""
    return "ok\n"


@get("/readyz", include_in_schema=False, media_type=MediaType.TEXT)
async def readyz(state: State) -> Response[str]:
    """Ready: PostgreSQL and Redis both answer."""
    context: AdminContext = state.admin
    problems = []
    try:
        await asyncio.wait_for(context.pool.fetchval("SELECT 1"), READY_TIMEOUT_SECONDS)
    except Exception as exc:
        problems.append(f"postgres: {exc!r}")
    try:
        await asyncio.wait_for(context.redis.ping(), READY_TIMEOUT_SECONDS)
    except Exception as exc:
        problems.append(f"redis: {exc!r}")
    if problems:
        return Response("not ready: " + "; ".join(problems) + "\n", status_code=503)
    return Response("ready\n", status_code=200)


@get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response[bytes]:
    """Prometheus text format."""
    context: AdminContext = state.admin
    return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    settings: Settings,
    *,
    rate_limit: int | None = None,
    rate_window_seconds: int = DEFAULT_RATE_WINDOW_SECONDS,
    pool_size: int = 10,
) -> Litestar:
    """The admin API for `settings`; it connects to PostgreSQL and Redis in its lifespan."""
    http_metrics = HttpMetrics()
    if rate_limit is None:
        rate_limit = settings.stats_rate_limit_per_minute * rate_window_seconds // 60

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, max_size=pool_size)
        redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5.0)
        app.state.admin = AdminContext(
            settings=settings,
            pool=pool,
            redis=redis,
            stats_cache=StatsCache(redis, settings.stats_cache_ttl_seconds),
            limiter=RateLimiter(redis, rate_limit, rate_window_seconds),
            metrics=http_metrics,
        )
        try:
            yield
        finally:
            await pool.close()
            await redis.aclose()

    return Litestar(
        route_handlers=[GoalController, healthz, readyz, metrics],
        lifespan=[lifespan],
        middleware=[
            MetricsMiddleware(http_metrics),
            # Only /api needs a key; health, metrics and the OpenAPI document do not.
            DefineMiddleware(
                ApiKeyAuthentication, exclude=["^/healthz", "^/readyz", "^/metrics", "^/schema"]
            ),
        ],
        exception_handlers={
            ValidationException: _name_fields,
            RecursionError: _too_deep,
            **{exc: _unavailable for exc in _UNAVAILABLE},
        },
        openapi_config=OpenAPIConfig(
            title="goalstream admin API",
            version=goalstream.__version__,
            description="Goal configuration and statistics per workflow (CONTRACT 5).",
            path=OPENAPI_PATH,
            render_plugins=[
                JsonRenderPlugin(),
                YamlRenderPlugin(),
                SwaggerRenderPlugin(),
                RedocRenderPlugin(),
            ],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="A key from `goalstream create-api-key --tenant UUID`.",
                    )
                }
            ),
        ),
        debug=False,
        logging_config=None,  # structlog (goalstream.log) owns the logging set-up
    )


def serve(settings: Settings) -> None:
    """Run the admin API on uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    base = f"http://{settings.admin_host}:{settings.admin_port}"
    log.info("admin API starting", url=base, openapi=f"{base}{OPENAPI_PATH}/openapi.json")
    uvicorn.run(
        create_app(settings),
        host=settings.admin_host,
        port=settings.admin_port,
        log_config=None,  # structlog owns the logging set-up
        access_log=False,
        lifespan="on",
    )


__all__ = ["HTTPException", "create_app", "serve"]
