"""Front configuration: read from IMAGEGATE_* and flags once, then passed down as a value."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from settings import shared
from settings.fields import (
    address_or_off,
    between,
    grpc_target,
    port,
    positive,
    setting,
)
from settings.loader import load

MiB = 1024 * 1024
# Only `serve-rest` reads these: `serve` dials its own service and has one listener.
REST_ONLY = ("serve-rest",)


@dataclass(frozen=True)
class GatewayConfig:
    """The REST front's settings. Adding one is one `setting()` here: the loader, the
    flags and docs/configuration.md follow."""

    grpc_target: str = setting(
        "127.0.0.1:50051",
        "`serve-rest`: where ImageService is (HOST:PORT)",
        check=grpc_target,
        commands=REST_ONLY,
        metavar="HOST:PORT",
    )
    host: str = shared.host()
    rest_port: int = setting(8080, "REST port of the aiohttp front", check=port)
    # Generation requests are small JSON; Envoy's front enforces the same limit.
    max_body_bytes: int = setting(
        1 * MiB, "largest request body the front accepts (413 above)", check=between(1024)
    )
    # The whole body: up to 16 images and a mask. It must stay below max_message_bytes,
    # since the body travels to the service in one gRPC message.
    max_upload_bytes: int = setting(
        60 * MiB,
        "largest edit or variation body the front accepts (413 above, checked as it streams "
        "in); Envoy's upload routes use the same 60 MiB; below `max_message_bytes`",
        check=between(1024),
    )
    max_message_bytes: int = shared.max_message_bytes()
    # Envoy's route timeout is the same, and slow models need minutes.
    timeout_s: float = setting(
        300.0,
        "the front's deadline (seconds) for one call to the service (504 after)",
        check=positive,
    )
    header_timeout_s: float = setting(
        60.0,
        "a connection must send a request's headers within this long (seconds) of opening or "
        "of the previous response; idle connections close after it",
        check=positive,
    )
    body_timeout_s: float = setting(
        60.0,
        "a request body must arrive within this long (seconds) of its headers (408 after)",
        check=positive,
    )
    # Envoy's max_request_headers_kb is the same 8 KiB.
    max_header_bytes: int = setting(
        8192,
        "request line and headers together (431 above); at most 100 headers",
        check=between(1024),
    )
    # Beside the service's 9464 on one host.
    rest_metrics_address: str = setting(
        "127.0.0.1:9465",
        "Prometheus `/metrics` of `serve-rest`; `off` disables",
        check=address_or_off,
        flag="--metrics-address",
        commands=REST_ONLY,
        metavar="HOST:PORT",
    )
    drain_grace_s: float = shared.drain_grace_s()
    trusted_proxies: str = shared.trusted_proxies()
    # `serve --workers N` sets both for its fronts, which dial every service worker,
    # their own worker's first (gateway/channels.py).
    grpc_round_robin: bool = setting(
        False,
        "`serve-rest`: spread calls over every address `grpc_target` resolves to, rather "
        "than the first that answers",
        commands=REST_ONLY,
    )
    grpc_prefer_first: bool = setting(
        False,
        "`serve-rest`, with grpc_round_robin: a generation or model listing goes to the first "
        "address that answers while this front has no other such call there, else is spread",
        commands=REST_ONLY,
    )

    def conflicts(self) -> Iterator[tuple[str, str]]:
        """Settings valid alone but not together."""
        if self.grpc_prefer_first and not self.grpc_round_robin:
            yield (
                "grpc_prefer_first",
                "needs grpc_round_robin: without it every call goes to the first address",
            )
        if self.max_upload_bytes >= self.max_message_bytes:
            yield (
                "max_upload_bytes",
                f"{self.max_upload_bytes} is not below max_message_bytes "
                f"({self.max_message_bytes}): an upload travels in one gRPC message",
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: object) -> GatewayConfig:
        """Defaults, then IMAGEGATE_* variables, then flags (text or typed values)."""
        return load(cls, os.environ if env is None else env, flags)
