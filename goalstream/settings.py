"""One frozen settings struct, built from the environment at start-up and passed down."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import msgspec

from goalstream import constants
from goalstream.errors import ConfigError


def default_consumer_name() -> str:
    """Host name and process id: unique in the group, and tells an operator where it runs."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a goalstream process can be told; every field has a working default."""

    redis_url: str = "redis://localhost:6379/0"
    database_url: str = "postgresql://localhost/goalstream"
    streams: tuple[str, ...] = constants.DEFAULT_STREAMS
    group: str = constants.DEFAULT_GROUP
    group_start: str = constants.DEFAULT_GROUP_START
    consumer: str = ""
    batch_size: int = 100
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    max_deliveries: int = 5
    log_format: str = "json"
    log_level: str = "INFO"
    stats_cache_ttl_seconds: int = 300
    stats_rate_limit_per_minute: int = 60
    admin_host: str = "127.0.0.1"
    admin_port: int = 8080
    metrics_port: int = 9108
    achieved_stream: str = constants.ACHIEVED_STREAM
    dlq_stream: str = constants.DLQ_STREAM
    cache_refresh_seconds: float = 60.0
    outbox_orphan_seconds: float = 10.0
    stale_consumer_ms: int = 3_600_000
    shutdown_timeout_seconds: float = 25.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read GOALSTREAM_* variables; keyword overrides (from CLI flags) win when not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field_type in _FIELD_TYPES.items():
            raw = env.get(f"GOALSTREAM_{name.upper()}")
            if raw is None or raw == "":
                continue
            values[name] = _parse(name, field_type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not values.get("consumer"):
            values["consumer"] = default_consumer_name()
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that cannot work, naming the variable."""
        if not self.streams:
            raise ConfigError("GOALSTREAM_STREAMS must name at least one stream")
        if len(set(self.streams)) != len(self.streams):
            raise ConfigError("GOALSTREAM_STREAMS names a stream twice")
        for name in ("batch_size", "max_deliveries", "stats_rate_limit_per_minute"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GOALSTREAM_{name.upper()} must be at least 1")
        if self.block_ms < 1 or self.claim_idle_ms < 1:
            # BLOCK 0 would wait forever, and a worker must look up to notice a stop.
            raise ConfigError("GOALSTREAM_BLOCK_MS and GOALSTREAM_CLAIM_IDLE_MS must be >= 1")
        if self.log_format not in ("json", "console"):
            raise ConfigError("GOALSTREAM_LOG_FORMAT must be 'json' or 'console'")
        if not 0 <= self.metrics_port <= 65535 or not 0 < self.admin_port <= 65535:
            raise ConfigError("GOALSTREAM_METRICS_PORT / GOALSTREAM_ADMIN_PORT out of range")


def _parse(name: str, field_type: str, raw: str) -> Any:
    if field_type == "tuple[str, ...]":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        if field_type == "int":
            return int(raw)
        if field_type == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"GOALSTREAM_{name.upper()}={raw!r} is not a {field_type}") from None
    return raw


_FIELD_TYPES: dict[str, str] = {
    name: str(field_type).replace("'", "") for name, field_type in Settings.__annotations__.items()
}
