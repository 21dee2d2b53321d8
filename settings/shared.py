"""Settings that both the service and the REST front read: one variable, so each is
declared here once and both config classes take its field from here (the loader
merges them into one row of the table)."""

from __future__ import annotations

from settings.fields import between, networks, not_empty, setting

MiB = 1024 * 1024


def host() -> str:
    return setting("127.0.0.1", "address the servers bind", check=not_empty)


def max_message_bytes() -> int:
    # gRPC messages carry whole images: n=10 large PNGs need far more than 4 MB, and an
    # edit's whole upload travels in one too (below the front's max_upload_bytes).
    return setting(
        64 * MiB,
        "gRPC message limit (service and front): n=10 large images, or one upload",
        check=between(MiB),
    )


def drain_grace_s() -> float:
    # Below Kubernetes' default 30 s before SIGKILL.
    return setting(
        25.0,
        "after SIGTERM, how long (seconds) requests in flight may take before they are "
        "cancelled and released",
        check=between(0),
    )


def trusted_proxies() -> str:
    # Loopback covers the aiohttp front and an Envoy on the same host.
    return setting(
        "127.0.0.0/8,::1/128",
        "peers (comma-separated CIDRs) whose forwarded `Host` may set image URL hosts: "
        "the aiohttp front and an Envoy on the same host; for the aiohttp front, the peers "
        "whose `X-Forwarded-Proto: https` marks the console's cookie `Secure`",
        check=networks,
        metavar="CIDRS",
    )
