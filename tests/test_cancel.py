"""Requests that end early, at any moment: nothing stays held, nothing is charged twice."""

from __future__ import annotations

import asyncio
import contextlib
import random

import aiohttp
import grpc
from imagegate.v1 import images_pb2, images_pb2_grpc

from tests.conftest import Stack, Tenant, make_tenant

REQUEST = images_pb2.GenerateImagesRequest(model="local", prompt="a moth", size="256x256")
BODY = {"model": "local", "prompt": "a moth", "size": "256x256"}
CREDIT = 1_000_000  # make_tenant's default $1
STEADY_POLLS = 6


async def assert_comes_to_rest(stack: Stack, tenant: Tenant) -> None:
    """Nothing stays held and the balance is credit minus what was delivered.

    Polled: a cancelled call ends at the client before its handler has ended in
    the service, and a handler may even reach the reserve step after its client
    is gone. So "nothing held" must hold, with the balance equal to credit minus
    delivered, for several polls in a row. A real leak never gets there, and the
    wait is bounded far below the reservations' 15-minute expiry.
    """
    store = stack.service.store
    steady, state = 0, ""
    try:
        async with asyncio.timeout(20):
            while steady < STEADY_POLLS:
                usage = await store.usage(tenant.account, limit=1000)
                account = await store.get_account(tenant.account)
                assert account is not None
                delivered = sum(u.cost_micros for u in usage if u.status == "settled")
                held = sum(u.status == "held" for u in usage)
                rest = not held and account.balance_micros == CREDIT - delivered
                steady = steady + 1 if rest else 0
                state = f"held={held} balance={account.balance_micros} delivered={delivered}"
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"the account never came to rest: {state}") from None
    assert await store.ledger_sum(tenant.account_id) == account.balance_micros


async def test_grpc_cancels_and_deadlines_at_random_moments(stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    rng = random.Random(6)
    metadata = [("authorization", f"Bearer {tenant.key}")]
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        await channel.channel_ready()

        async def one(i: int) -> None:
            if i % 2:
                # The caller's deadline: the service's handler is cancelled when it passes.
                call = stub.GenerateImages(
                    REQUEST, metadata=metadata, timeout=rng.uniform(0.001, 0.02)
                )
            else:
                call = stub.GenerateImages(REQUEST, metadata=metadata)
                await asyncio.sleep(rng.uniform(0, 0.02))
                call.cancel()
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                await call

        for _ in range(6):
            await asyncio.gather(*(one(i) for i in range(24)))
    await assert_comes_to_rest(stack, tenant)


async def test_rest_clients_hanging_up_at_random_moments(base_url: str, stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {tenant.key}"}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            try:
                async with asyncio.timeout(rng.uniform(0.002, 0.03)):
                    post = session.post(
                        f"{base_url}/v1/images/generations", json=BODY, headers=headers
                    )
                    async with post as response:
                        await response.read()
            except TimeoutError:
                pass

        for _ in range(4):
            await asyncio.gather(*(one() for _ in range(16)))
    await assert_comes_to_rest(stack, tenant)
