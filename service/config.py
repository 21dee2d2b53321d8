"""Service configuration: read from IMAGEGATE_* once, then passed down as a value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    data_dir: Path = Path(".imagegate")
    # sqlite:///path or postgresql://... ; empty means SQLite in data_dir.
    database_url: str = field(default="", repr=False)
    # Connections each process keeps to PostgreSQL (replicas x this <= max_connections).
    database_pool_size: int = 10
    catalog: Path | None = None
    default_model: str = "local"
    # Base of every returned image URL; empty: the host the front reports (from a
    # trusted proxy only), else the REST address this process serves.
    public_url: str = ""
    # Peers (CIDRs, comma-separated) whose x-forwarded-host may set image URL hosts:
    # loopback covers the aiohttp front and an Envoy on the same host.
    trusted_proxies: str = "127.0.0.0/8,::1/128"
    image_ttl_s: int = 3600
    # Empty: generated once and kept in data_dir (set it when replicas share links;
    # required with an s3:// image store).
    url_secret: str = field(default="", repr=False)
    # Where images live: empty = files under data_dir/images; s3://BUCKET/PREFIX = a
    # bucket every replica shares (endpoint and credentials from the AWS_* variables).
    image_store: str = ""
    # gRPC messages carry whole images: n=10 large PNGs need far more than 4 MB.
    # An edit's whole upload travels in one too (the REST fronts' max_upload_bytes).
    max_message_bytes: int = 64 * MiB
    # Input images of edits and variations: most pixels one may have (decompression
    # bombs are refused by their header, before decoding).
    max_upload_pixels: int = 40_000_000
    # Hosts (comma-separated; exact, or *.suffix) that edits' images[].image_url may be
    # fetched from. Empty: remote image URLs are refused (data: URLs always work).
    image_url_hosts: str = ""
    # Longest an upstream call may take; slow models need minutes.
    upstream_timeout_s: float = 300.0
    # How often held reservations past their expiry are released and old images deleted.
    sweep_interval_s: float = 60.0
    # How often a running service records that it lives; what a process silent for
    # six intervals held is released by the others (at once if it ran on this machine).
    heartbeat_interval_s: float = 5.0
    # Per-key limits for keys that set none of their own; 0: no limit.
    limit_rpm: int = 0
    limit_ipm: int = 0
    limit_concurrency: int = 0
    limit_max_n: int = 0
    # redis://... shares limits across replicas; empty: counted in each process.
    redis_url: str = field(default="", repr=False)
    # Prefix of every Redis key imagegate writes (several deployments, or test runs,
    # can share one Redis).
    redis_prefix: str = "imagegate"
    # How long an Idempotency-Key and its stored response are kept (at least 24 hours).
    idempotency_ttl_s: float = 86400.0
    # Prometheus /metrics (HOST:PORT, or "off"); `serve` serves the front's there too.
    metrics_address: str = "127.0.0.1:9464"
    # After SIGTERM: how long calls in flight may take to finish before they are
    # cancelled and released. Below Kubernetes' default 30 s before SIGKILL.
    drain_grace_s: float = 25.0
    # Log lines as JSON objects, or "text" for a terminal.
    log_format: str = "json"
    # How long a found API key is trusted before it is read again (at most 1 s): how
    # long a revocation, or a change of its models or limits, takes to reach every
    # replica. 0: read the database on every request.
    key_cache_ttl_s: float = 1.0
    # Run the servers on uvloop (faster than asyncio's loop); false: asyncio's own.
    uvloop: bool = True

    @property
    def uses_postgres(self) -> bool:
        return self.database_url.startswith(POSTGRES_SCHEMES)

    @property
    def sqlite_path(self) -> Path:
        url = self.database_url
        if not url:
            return self.data_dir / "imagegate.db"
        if url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///"))
        # Only the scheme: the rest of a URL may hold a password.
        raise ValueError(
            f"unsupported database URL scheme {url.split(':', 1)[0]!r}: "
            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE"
        )

    @property
    def reservation_ttl_s(self) -> float:
        # A held reservation outlives any request that could still settle it.
        return self.upstream_timeout_s + 600

    @property
    def instance_stale_s(self) -> float:
        return 6 * self.heartbeat_interval_s

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then IMAGEGATE_* variables, then explicit overrides (CLI flags)."""
        env = os.environ if env is None else env
        config = cls()
        values: dict[str, Any] = {}
        for name, default in config.__dict__.items():
            raw = env.get(f"IMAGEGATE_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = _coerce(name, raw, default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(config, **values)


def _coerce(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path) or name == "catalog":
            return Path(raw)
    except ValueError as exc:
        raise ValueError(f"IMAGEGATE_{name.upper()}={raw!r}: {exc}") from exc
    return raw
