"""Front configuration: read from IMAGEGATE_* once, then passed down as a value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class GatewayConfig:
    grpc_target: str = "127.0.0.1:50051"
    host: str = "127.0.0.1"
    rest_port: int = 8080
    # Generation requests are small JSON; Envoy's front enforces the same limit.
    max_body_bytes: int = 1 * MiB
    # Edit and variation uploads (the whole body: up to 16 images and a mask); Envoy's
    # upload routes have the same limit. It must stay below max_message_bytes, since
    # the body travels to the service in one gRPC message.
    max_upload_bytes: int = 60 * MiB
    # Must match the service's limit: responses carry whole images.
    max_message_bytes: int = 64 * MiB
    # Deadline for one call to the service when the client sets none; Envoy's
    # route timeout is the same, and slow models need minutes.
    timeout_s: float = 300.0
    # A connection must deliver a request's headers this long after it opens or
    # after the previous response; idle keep-alive connections close after it too.
    header_timeout_s: float = 60.0
    # A request body must have arrived this long after its headers (408 after).
    body_timeout_s: float = 60.0
    # Request line plus headers, all together (431 above); Envoy's
    # max_request_headers_kb is the same 8 KiB.
    max_header_bytes: int = 8192
    # Prometheus /metrics of `serve-rest` (HOST:PORT, or "off"); `serve` uses the
    # service's metrics_address for both. Beside the service's 9464 on one host.
    rest_metrics_address: str = "127.0.0.1:9465"
    # After SIGTERM: how long requests in flight may take before they are cancelled.
    drain_grace_s: float = 25.0
    # Spread calls over every address of grpc_target (`serve --workers N` gives each
    # front all the service workers), rather than the first that answers.
    grpc_round_robin: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> GatewayConfig:
        env = os.environ if env is None else env
        config = cls()
        values: dict[str, Any] = {}
        for name, default in config.__dict__.items():
            raw = env.get(f"IMAGEGATE_{name.upper()}")
            if raw:
                is_bool = isinstance(default, bool)
                values[name] = (
                    raw.lower() in ("1", "true", "yes", "on") if is_bool else type(default)(raw)
                )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(config, **values)
