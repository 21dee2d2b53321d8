"""Where returned image URLs point: the public URL, a trusted proxy's host, or the REST address."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The aiohttp front's default address: where URLs point when nothing else says.
DEFAULT_REST_URL = "http://127.0.0.1:8080"
# Host values we are willing to echo into image URLs.
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def url_host(host: str) -> str:
    """A bound host as clients dial it and URLs name it: loopback for a wildcard,
    an IPv6 literal in brackets."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bind_address(host: str, port: int) -> str:
    """host:port as gRPC binds it (an IPv6 literal needs its brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def parse_networks(text: str) -> tuple[Network, ...]:
    """'127.0.0.0/8, ::1' -> networks; ValueError naming the bad entry."""
    networks = []
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"IMAGEGATE_TRUSTED_PROXIES: {entry!r} is not an address or CIDR block"
            ) from None
    return tuple(networks)


@dataclass
class LinkBase:
    """Chooses the scheme://host[:port] of a request's image URLs.

    Client headers are input, not truth: with `public_url` set it always wins;
    otherwise a forwarded host is used only when the peer that sent it is one of
    our trusted proxies (the fronts pass the Host their client used). Else the
    REST address this process serves, known once the front is bound.
    """

    public_url: str
    trusted: tuple[Network, ...]
    fallback_url: str = DEFAULT_REST_URL

    def base_url(self, peer_ip: str | None, host: str | None, proto: str | None) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        if (
            host
            and proto in ("http", "https")
            and _HOST_RE.fullmatch(host)
            and self.is_trusted(peer_ip)
        ):
            return f"{proto}://{host}"
        return self.fallback_url.rstrip("/")

    def is_trusted(self, peer_ip: str | None) -> bool:
        if not peer_ip:
            return False
        return _trusted(self.trusted, peer_ip)


# Every request asks for its peer (most often one of a few fronts): parsed once.
@functools.lru_cache(maxsize=1024)
def _trusted(trusted: tuple[Network, ...], peer_ip: str) -> bool:
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)
