"""Readiness (the gRPC health service) and graceful drain of the calls in flight.

SERVING means: the database answered the last heartbeat, the catalog serves at
least one model, and no drain has started. A drain turns NOT_SERVING at once
and for good; new ImageService calls are refused with UNAVAILABLE (grpc_observe.py)
while those in flight finish, until the grace period ends or a second signal
forces them: each is then cancelled, which releases its reservation, and
answered UNAVAILABLE so that the caller retries elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from grpc_health.v1 import health, health_pb2
from imagegate.v1 import admin_pb2, images_pb2

from service import metrics

log = logging.getLogger("imagegate.lifecycle")
SERVICE_NAME = images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    """The health service's answer for "", ImageService and AdminService (they share the
    database), from what this process knows."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.database = True
        self.catalog = True
        self.draining = False

    @property
    def serving(self) -> bool:
        return self.database and self.catalog and not self.draining

    async def update(self, *, database: bool | None = None, catalog: bool | None = None) -> None:
        if database is not None and database != self.database:
            log.warning("database %s", "reachable again" if database else "unreachable")
            self.database = database
        if catalog is not None:
            self.catalog = catalog
        await self._publish()

    async def drain(self) -> None:
        self.draining = True
        await self._publish()

    async def _publish(self) -> None:
        status = SERVING if self.serving else NOT_SERVING
        for name in ("", SERVICE_NAME, ADMIN_SERVICE_NAME):
            await self.servicer.set(name, status)
        metrics.ready(self.serving)


class InFlight:
    """The ImageService calls in flight, so that a drain can wait for them or end them."""

    def __init__(self) -> None:
        self.draining = False
        self._calls: set[asyncio.Task[object]] = set()
        self._forced: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def enter(self, task: asyncio.Task[object]) -> None:
        self._calls.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self._calls.discard(task)
        self._forced.discard(task)
        if not self._calls:
            self._idle.set()

    def forced(self, task: asyncio.Task[object]) -> bool:
        """Whether this call was cancelled by the drain (not by its caller or deadline)."""
        return task in self._forced

    async def wait(self, grace_s: float, force: asyncio.Event) -> bool:
        """Until every call has ended (True), the grace period is over or `force` is set."""
        idle = asyncio.ensure_future(self._idle.wait())
        forced = asyncio.ensure_future(force.wait())
        try:
            await asyncio.wait({idle, forced}, timeout=grace_s, return_when="FIRST_COMPLETED")
        finally:
            for waiter in (idle, forced):
                waiter.cancel()
        return not self._calls

    async def cancel_all(self) -> None:
        """Cancel what is left and wait until each has resolved its reservation and ended."""
        calls = list(self._calls)
        if calls:
            log.warning("drain: cancelling %d calls still in flight", len(calls))
        for task in calls:
            self._forced.add(task)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*calls, return_exceptions=True)


def stop_signals() -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, force): the first SIGTERM or SIGINT starts the drain, the next one ends it."""
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def received(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: cancelling what is still in flight", name)
            force.set()
        else:
            log.info("%s: draining", name)
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, received, sig.name)
    return stop, force
