"""The front's gRPC channels to the service, and which one a generation takes.

With `grpc_prefer_first` (what `serve --workers N` sets for its fronts, whose target
lists their own worker's service first) a front keeps two channels to the same
addresses: one calling the first address while it answers (pick_first: then the
next), one spreading calls over all of them (`grpc_round_robin`). A generation, or
a model listing, takes the first channel while the front has no other such call on
it, and the spread one otherwise. A request alone thus goes to its own worker's
service, which the kernel learns to wake on the front's core: up to 1.1 ms and
0.9 ms of CPU less a sequential request than round robin alone in same-run A/Bs,
though not in every run (docs/performance.md). A burst still reaches every
service, however unevenly the kernel spread the connections over the fronts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.config import GatewayConfig

Unary = Callable[..., Awaitable[Any]]


class Channels:
    """The channel every call takes (`spread`), and with grpc_prefer_first the one a
    lone call prefers."""

    def __init__(self, config: GatewayConfig) -> None:
        size = config.max_message_bytes
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ]
        balance = [("grpc.lb_policy_name", "round_robin")] if config.grpc_round_robin else []
        self.spread = grpc.aio.insecure_channel(config.grpc_target, options=options + balance)
        self.first = None
        if config.grpc_prefer_first:
            self.first = grpc.aio.insecure_channel(config.grpc_target, options=options)
        self._busy = False

    def unary(self, method: str, serializer: Callable[[Any], bytes]) -> Unary:
        """`method` returning the raw reply: on the first channel while it is free."""
        spread: Unary = self.spread.unary_unary(method, request_serializer=serializer)
        if self.first is None:
            return spread
        first: Unary = self.first.unary_unary(method, request_serializer=serializer)

        async def call(request: Any, **options: Any) -> Any:
            if self._busy:
                return await spread(request, **options)
            self._busy = True
            try:
                return await first(request, **options)
            finally:
                self._busy = False

        return call

    async def close(self) -> None:
        await self.spread.close()
        if self.first is not None:
            await self.first.close()
