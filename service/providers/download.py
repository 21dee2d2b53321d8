"""Fetching images from URLs an upstream returned, without becoming an SSRF proxy.

A provider's reply is untrusted input: its URL may point anywhere. A URL is
fetched only if its host is on the provider's `download_hosts` list (exact
names, or `*.suffix` for subdomains), and the address actually connected to
is checked after resolution: a private, loopback, link-local, multicast or
reserved address is refused unless the host is listed *exactly* (tests and
on-premises servers list `127.0.0.1` or an internal name on purpose). The
check sits in the connector's resolver, so the address checked is the
address used, and redirects are followed by hand so each hop is checked too.
Plain http is allowed only for exactly listed hosts. The body has a size cap
and a deadline, and must decode as a PNG, JPEG or WebP image.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import warnings
from collections.abc import Sequence
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image
from yarl import URL

from service.errors import UpstreamError
from service.providers.http import image_type, read_body

MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
# Larger than any image model's output (16 MP), small enough to refuse decompression bombs.
MAX_PIXELS = 40_000_000
MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)


class HostPolicy:
    """Which hosts and addresses a provider's output URLs may use."""

    def __init__(self, hosts: Sequence[str]) -> None:
        patterns = [h.strip().lower().rstrip(".") for h in hosts if h.strip()]
        self._exact = frozenset(p for p in patterns if not p.startswith("*."))
        self._suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))

    def listed_exactly(self, host: str) -> bool:
        return _norm(host) in self._exact

    def allows_host(self, host: str) -> bool:
        name = _norm(host)
        return name in self._exact or any(name.endswith(s) for s in self._suffixes)

    def allows_address(self, host: str, address: str) -> bool:
        """A public address always; a private one only for a host listed exactly."""
        if self.listed_exactly(host):
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_global and not ip.is_multicast


def _norm(host: str) -> str:
    return host.lower().rstrip(".").strip("[]")


class _CheckingResolver(AbstractResolver):
    """Resolves as usual, then drops every address the policy refuses for that host."""

    def __init__(self, policy: HostPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.allows_address(host, r["host"])]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses downloads may not use")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class SafeDownloader:
    """One per provider: its own connection pool, with the checking resolver."""

    def __init__(
        self,
        provider_id: str,
        hosts: Sequence[str],
        *,
        max_bytes: int = MAX_DOWNLOAD_BYTES,
        timeout_s: float = 60.0,
    ) -> None:
        self._provider_id = provider_id
        self._policy = HostPolicy(hosts)
        self._max_bytes = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_CheckingResolver(self._policy), limit=32)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=False
            )
        return self._session

    async def fetch(self, url: str) -> tuple[bytes, str]:
        """The image at `url` and its MIME type, or UpstreamError saying why not."""
        try:
            async with asyncio.timeout(self._timeout.total):
                for _ in range(MAX_REDIRECTS + 1):
                    target = self._checked(url)
                    async with self._client().get(target, allow_redirects=False) as response:
                        if response.status in REDIRECTS and "Location" in response.headers:
                            url = urljoin(str(target), response.headers["Location"])
                            continue
                        if response.status != 200:
                            raise self._error(f"answered HTTP {response.status}")
                        declared = response.headers.get("Content-Type", "").split(";")[0].strip()
                        if declared and not declared.startswith(("image/", "application/octet")):
                            raise self._error(f"is not an image ({declared})")
                        data = await read_body(response, self._provider_id, self._max_bytes)
                        break
                else:
                    raise self._error("redirected too many times")
        except TimeoutError:
            raise self._error("timed out", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise self._error(f"could not be fetched ({type(exc).__name__})") from None
        content_type = image_type(data, self._provider_id)
        await asyncio.to_thread(self._check_decodes, data)
        return data, content_type

    def _checked(self, url: str) -> URL:
        try:
            target = URL(url)
        except (ValueError, TypeError):
            raise self._error("is not a valid URL") from None
        host = target.host or ""
        if target.scheme not in ("https", "http") or not host:
            raise self._error("is not an http(s) URL")
        if not self._policy.allows_host(host):
            raise self._error(f"is on a host not allowed for downloads ({host})")
        if target.scheme == "http" and not self._policy.listed_exactly(host):
            raise self._error("is not https")
        # IP literals bypass the resolver: check them here.
        try:
            ipaddress.ip_address(_norm(host))
        except ValueError:
            return target
        if not self._policy.allows_address(host, _norm(host)):
            raise self._error(f"points at an address downloads may not use ({host})")
        return target

    def _check_decodes(self, data: bytes) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    if image.width * image.height > MAX_PIXELS:
                        raise ValueError("too many pixels")
                    image.verify()
        except Exception:
            raise self._error("is not a decodable image") from None

    def _error(self, why: str, *, retryable: bool = False) -> UpstreamError:
        return UpstreamError(
            f"An image URL returned by the upstream provider '{self._provider_id}' {why}.",
            retryable=retryable,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
