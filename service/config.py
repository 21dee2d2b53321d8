"""Service configuration: read from IMAGEGATE_* and flags once, then passed down as a value."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from service.logs import FORMATS as LOG_FORMATS
from settings import shared
from settings.fields import (
    EVERY_COMMAND,
    NO_FLAG,
    SERVICE,
    address_or_off,
    between,
    existing_file,
    hosts,
    not_empty,
    one_of,
    port,
    positive,
    setting,
    url,
)
from settings.loader import load

MiB = 1024 * 1024
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
LOG_LEVELS = ("debug", "info", "warning")
# The admin commands (accounts, credit, keys, usage, migrate) open the database too.
STORE = (*SERVICE, "admin")


@dataclass(frozen=True)
class Config:
    """The service's settings (and the log settings of every command). Adding one is
    one `setting()` here: the loader, the flags and docs/configuration.md follow."""

    host: str = shared.host()
    grpc_port: int = setting(50051, "gRPC port", check=port)
    data_dir: Path = setting(
        Path(".imagegate"),
        "SQLite database, image files, URL-signing key",
        commands=STORE,
        metavar="DIR",
    )
    database_url: str = setting(
        "",
        "`sqlite:///PATH`, or `postgresql://USER:PASSWORD@HOST:PORT/DB` for several replicas",
        check=url("sqlite", "postgresql", "postgres", show=False),
        secret=True,
        default_text="SQLite in the data dir",
        commands=STORE,
        metavar="URL",
    )
    database_pool_size: int = setting(
        10,
        "PostgreSQL connections per process (replicas x this <= the server's max_connections)",
        check=between(1),
        commands=STORE,
    )
    catalog: Path | None = setting(
        None,
        "your catalog TOML, laid over the defaults",
        check=existing_file,
        commands=(*SERVICE, "models"),
        default_text="the shipped catalog",
    )
    default_model: str = setting("local", "model used when a request names none", check=not_empty)
    # Empty: the host the front reports (from a trusted proxy only), else the REST
    # address this process serves.
    public_url: str = setting(
        "",
        "base of every image URL; when not set, the host the front reports (trusted proxies "
        "only), else the REST address this process serves (`serve`) or `http://HOST:8080` "
        "(`serve-grpc`)",
        check=url("http", "https"),
        metavar="URL",
    )
    trusted_proxies: str = shared.trusted_proxies()
    image_ttl_s: int = setting(
        3600, "lifetime of image links (seconds); images are deleted after it", check=between(1)
    )
    # Set it when replicas share links. Environment only: a flag shows in `ps`.
    url_secret: str = setting(
        "",
        "URL-signing key; the same on every replica that serves the others' links "
        "(required with an S3 image store)",
        flag=NO_FLAG,
        secret=True,
        default_text="generated into the data dir",
    )
    image_store: str = setting(
        "",
        "`s3://BUCKET/PREFIX`: images in an S3-compatible bucket shared by replicas, "
        "client set by the `AWS_*` variables",
        check=url("s3"),
        default_text="the data dir's `images/` folder",
        metavar="URL",
    )
    max_message_bytes: int = shared.max_message_bytes()
    # Decompression bombs are refused by their header, before decoding.
    max_upload_pixels: int = setting(
        40_000_000,
        "most pixels an input image of an edit or variation may have (400 above)",
        check=between(1),
    )
    image_url_hosts: str = setting(
        "",
        "hosts (comma-separated; exact, or `*.suffix`) that edits' `images[].image_url` may "
        "be fetched from; not set: remote URLs are refused with a 400 (data: URLs always work)",
        check=hosts,
        metavar="HOSTS",
    )
    # Slow models need minutes.
    upstream_timeout_s: float = setting(
        300.0, "longest an upstream call may take (seconds)", check=positive
    )
    sweep_interval_s: float = setting(
        60.0,
        "how often (seconds) stale reservations are released and old images deleted",
        check=positive,
    )
    heartbeat_interval_s: float = setting(
        5.0,
        "how often (seconds) a running service records that it lives; others release what "
        "a process silent for 6 intervals held",
        check=positive,
    )
    limit_rpm: int = setting(
        0,
        "requests per minute of a key with no value of its own; `0`: no limit",
        check=between(0),
    )
    limit_ipm: int = setting(0, "images per minute of such a key", check=between(0))
    limit_concurrency: int = setting(
        0, "requests in flight at once of such a key", check=between(0)
    )
    limit_max_n: int = setting(
        0,
        "images per request of such a key (the model's own maximum still applies)",
        check=between(0),
    )
    redis_url: str = setting(
        "",
        "`redis://HOST:6379/0`: limits shared by every replica (`pip install "
        "'imagegate[redis]'`); not set: counted per process",
        check=url("redis", "rediss", "unix", show=False),
        secret=True,
        metavar="URL",
    )
    # Several deployments, or test runs, can share one Redis.
    redis_prefix: str = setting(
        "imagegate", "prefix of every Redis key imagegate writes", check=not_empty
    )
    idempotency_ttl_s: float = setting(
        86400.0,
        "how long (seconds) an Idempotency-Key and its stored response are kept",
        check=positive,
    )
    metrics_address: str = setting(
        "127.0.0.1:9464",
        "Prometheus `/metrics` of `serve` (service and front together) and `serve-grpc`; "
        "`off` disables",
        check=address_or_off,
        metavar="HOST:PORT",
    )
    drain_grace_s: float = shared.drain_grace_s()
    log_format: str = setting(
        "json",
        "`json`: one JSON object per line; `text` for a terminal",
        check=one_of(*LOG_FORMATS),
        commands=EVERY_COMMAND,
        metavar="{" + ",".join(LOG_FORMATS) + "}",
    )
    log_level: str = setting(
        "info",
        "least severe log lines written",
        check=one_of(*LOG_LEVELS),
        commands=EVERY_COMMAND,
        metavar="{" + ",".join(LOG_LEVELS) + "}",
    )
    workers: int = setting(
        0,
        "`serve`: service and REST front processes of each kind under one supervisor; "
        "`0`: one per core; `1`: both in this one process, no supervisor",
        check=between(0),
        commands=("serve",),
    )
    # docs/performance.md: a hop between threads or processes that wakes another core
    # costs far more than one on the same core. Off by default: a pinned worker cannot
    # move off a core that something else keeps busy.
    pin_workers: bool = setting(
        False,
        "`serve --workers N`: pin worker i (its service and its front) to the i-th core this "
        "process may use; for a machine that runs nothing else busy",
        commands=("serve",),
    )
    # How long a revocation, or a change of a key's models or limits, takes to reach
    # every replica: a found key is trusted this long before it is read again.
    key_cache_ttl_s: float = setting(
        1.0,
        "how long (seconds, at most 1) a found API key is trusted before it is read again; "
        "`0`: read the database on every request",
        check=between(0, 1),
        commands=SERVICE,
    )
    uvloop: bool = setting(
        True,
        "run the servers on uvloop (faster than asyncio's own loop); off: asyncio's loop",
        commands=(*SERVICE, "serve-rest"),
    )
    # Measures what the bench reports as the longest event-loop stall; costs a wake-up
    # every 2 ms, so it is never on by default.
    stall_log: str = setting(
        "",
        "diagnostics: a folder where each `serve --workers` process writes its event loop's "
        "longest stall of every second (the bench sets it); not set: off",
        commands=("serve",),
        metavar="DIR",
    )

    def conflicts(self) -> Iterator[tuple[str, str]]:
        """Settings valid alone but not together."""
        if self.image_store.startswith("s3://") and not self.url_secret:
            yield (
                "url_secret",
                "required with an s3:// image_store, the same on every replica "
                "(e.g. `openssl rand -hex 32`)",
            )

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
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: object) -> Config:
        """Defaults, then IMAGEGATE_* variables, then flags (text or typed values)."""
        return load(cls, os.environ if env is None else env, flags)
