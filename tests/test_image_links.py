"""Image URL hosts: the public URL when set, a trusted proxy's forwarded host, else our own."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.links import DEFAULT_REST_URL, LinkBase, bind_address, parse_networks, url_host
from service.servicer import _peer_ip
from tests.conftest import FRONTS, Stack, make_tenant, start_stack
from tests.rest import call

PUBLIC = "https://images.example.test"
FILES = "/v1/images/files/"
EVIL = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
BODY = {"model": "local", "prompt": "a signpost", "size": "256x256"}


@pytest.fixture(scope="module")
async def public(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack, closers = await start_stack(
        tmp_path_factory.mktemp("public"), envoy="envoy" in FRONTS, public_url=PUBLIC + "/"
    )
    yield stack
    for close in closers:
        await close()


@pytest.fixture(scope="module")
async def distrustful(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A service that trusts no proxy on this machine (its fronts included)."""
    stack, closers = await start_stack(
        tmp_path_factory.mktemp("distrustful"), envoy=False, trusted_proxies="192.0.2.0/24"
    )
    yield stack
    for close in closers:
        await close()


async def _grpc_url(stack: Stack, metadata: list[tuple[str, str]]) -> str:
    tenant = await make_tenant(stack.service)
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        reply = await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
            images_pb2.GenerateImagesRequest(**BODY),
            metadata=[("authorization", f"Bearer {tenant.key}"), *metadata],
        )
    return reply.data[0].url


async def _rest_url(stack: Stack, front: str, headers: dict[str, str]) -> str:
    tenant = await make_tenant(stack.service)
    url = f"{stack.fronts[front]}/v1/images/generations"
    reply = await call("POST", url, key=tenant.key, json_body=BODY, headers=headers)
    assert reply.status == 200, reply.body
    return str(reply.json()["data"][0]["url"])


FORWARDED = [("x-forwarded-host", "evil.example"), ("x-forwarded-proto", "https")]


@pytest.mark.parametrize("front", FRONTS)
async def test_public_url_wins_over_any_host_header(public: Stack, front: str) -> None:
    url = await _rest_url(public, front, EVIL)
    assert url.startswith(PUBLIC + FILES)
    # The link works where it points (the test reaches the front by its real address).
    assert (await call("GET", public.fronts[front] + url.removeprefix(PUBLIC))).status == 200


async def test_public_url_wins_over_grpc_metadata(public: Stack) -> None:
    assert (await _grpc_url(public, FORWARDED)).startswith(PUBLIC + FILES)


async def test_untrusted_peer_cannot_choose_the_host(distrustful: Stack) -> None:
    assert (await _grpc_url(distrustful, FORWARDED)).startswith(DEFAULT_REST_URL + FILES)
    url = await _rest_url(distrustful, "aiohttp", EVIL)
    assert url.startswith(DEFAULT_REST_URL + FILES)


async def test_trusted_proxy_sets_the_host(stack: Stack) -> None:
    """By default loopback is trusted: the fronts on this host say where the client was."""
    metadata = [("x-forwarded-host", "front.example:8443"), ("x-forwarded-proto", "https")]
    assert (await _grpc_url(stack, metadata)).startswith("https://front.example:8443" + FILES)
    # A value that is no host name is never echoed.
    bad = [("x-forwarded-host", "evil.example/x?"), ("x-forwarded-proto", "https")]
    assert (await _grpc_url(stack, bad)).startswith(DEFAULT_REST_URL + FILES)


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),
        ("ipv6:[::ffff:10.1.2.3]:80", "::ffff:10.1.2.3"),
        ("unix:/run/imagegate.sock", None),
        ("", None),
    ],
)
def test_peer_addresses(peer: str, ip: str | None) -> None:
    assert _peer_ip(peer) == ip


def test_trust_rules() -> None:
    links = LinkBase("", parse_networks("127.0.0.0/8, ::1/128 ,10.0.0.0/8"))
    assert links.is_trusted("127.0.0.9") and links.is_trusted("::1")
    assert links.is_trusted("::ffff:10.1.2.3")  # IPv4-mapped: judged as IPv4
    assert not links.is_trusted("192.0.2.1") and not links.is_trusted(None)
    assert not links.is_trusted("not an address")
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33'")):
        parse_networks("127.0.0.0/8,10.0.0.0/33")


@pytest.mark.parametrize(
    ("bound", "dialled", "bind"),
    [
        ("127.0.0.2", "127.0.0.2", "127.0.0.2:1"),
        ("0.0.0.0", "127.0.0.1", "0.0.0.0:1"),
        ("::", "[::1]", "[::]:1"),
        ("::1", "[::1]", "[::1]:1"),
        ("example.test", "example.test", "example.test:1"),
    ],
)
def test_addresses_as_dialled_and_bound(bound: str, dialled: str, bind: str) -> None:
    assert url_host(bound) == dialled
    assert bind_address(bound, 1) == bind
