"""Dispatch policy: split `n` into upstream calls, retry, fail over, and pause failing routes.

For one validated request and its model's routes (in order of preference):
- `n` is split into parallel calls of at most min(route.max_n, adapter.max_n) images;
- a call retries a retryable UpstreamError on the same route, with full-jitter
  exponential backoff or the upstream's Retry-After, while the deadline allows;
- then it fails over to the next route (with a split of its own if that route's
  cap is smaller);
- a circuit breaker per route (provider id + upstream model) skips a route after
  `breaker_failures` consecutive failed attempts, for `breaker_cooldown_s`, then
  lets one probe call through: success closes it, failure opens it again;
- a safety refusal (ContentPolicy) or a request the upstream refused as such
  (UpstreamRejected) is final: never retried, never failed over, and not a
  breaker failure (the route answered).
The images of the calls that succeeded are returned even if others failed; the
error is raised only when every call failed. Domain code: no grpc, no HTTP.

`stream()` runs the same policy for a streamed request and passes each call's
events on as they come (previews, then each image). A call is retried or failed
over only until it has passed an event on: after that the caller has seen its
previews, so its error is final for it, and the images it did deliver count.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.catalog import Route
from service.catalog_settings import DispatchSettings, ProviderSettings
from service.errors import ContentPolicy, DeadlineExceeded, UpstreamError, UpstreamRejected
from service.providers.base import (
    CompletedImage,
    GeneratedImage,
    Provider,
    ProviderResult,
    StreamEvent,
    StreamingProvider,
    TokenUsage,
    UpstreamCall,
    generated_events,
    operation,
)
from service.providers.observed import upstream_observed
from service.requests import EDIT, GENERATE, ImageRequest

log = logging.getLogger("imagegate.dispatch")
T = TypeVar("T")
# Final for the whole request: nothing else is tried after one of these.
FINAL = (ContentPolicy, UpstreamRejected)


@dataclass(frozen=True)
class CallResult:
    """One upstream call that succeeded: its route, images (at most `asked`) and usage."""

    route: Route
    asked: int
    images: list[GeneratedImage]
    usage: TokenUsage = field(default_factory=TokenUsage)


@dataclass(frozen=True)
class Dispatched:
    calls: list[CallResult]
    # Errors of the calls that failed when others succeeded (partial success).
    failures: list[Exception] = field(default_factory=list)

    @property
    def images(self) -> list[GeneratedImage]:
        return [image for call in self.calls for image in call.images]


@dataclass(frozen=True)
class Streamed:
    """One event of a streamed dispatch, and the upstream call (attempt) that sent it."""

    call: int
    route: Route
    event: StreamEvent


@dataclass(frozen=True)
class _Done:
    """The end of a streamed dispatch: None, or the error that sums up its failures."""

    error: Exception | None


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Breaker:
    """Consecutive failures of one route, and whether it is paused."""

    threshold: int
    cooldown_s: float
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def paused(self, now: float) -> bool:
        """Open and still cooling down, or half-open with its probe in flight."""
        if self.state is BreakerState.OPEN:
            return now - self.opened_at < self.cooldown_s
        return self.state is BreakerState.HALF_OPEN and self.probing

    def allow(self, now: float) -> bool:
        """May a call go out now? In half-open, the one that may is the probe."""
        if self.paused(now):
            return False
        if self.state is not BreakerState.CLOSED:
            self.state, self.probing = BreakerState.HALF_OPEN, True
        return True

    def success(self) -> None:
        self.state, self.failures, self.probing = BreakerState.CLOSED, 0, False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state, self.opened_at, self.probing = BreakerState.OPEN, now, False

    def abandon(self) -> None:
        """A call ended without a verdict (cancelled): let the next one probe."""
        self.probing = False


@dataclass(frozen=True)
class RouteHealth:
    provider: str
    upstream_model: str
    state: str
    consecutive_failures: int
    # Seconds until an open breaker lets a probe through; 0 otherwise.
    retry_in_s: float


@dataclass
class _Job:
    request: ImageRequest
    routes: Sequence[Route]
    request_id: str
    # time.monotonic() by which everything must be over.
    end: float
    # Whether `end` is the caller's deadline (rather than upstream_timeout_s).
    caller_bound: bool
    # Streamed requests: where each call's events go as they come.
    sink: Callable[[Streamed], None] | None = None
    # Numbers the upstream calls (attempts) of a streamed request.
    attempts: itertools.count[int] = field(default_factory=itertools.count)


@dataclass
class _Outcome:
    results: list[CallResult] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)


class Dispatcher:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        settings: DispatchSettings | None = None,
        *,
        provider_settings: Mapping[str, ProviderSettings] | None = None,
        upstream_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random_: Callable[[], float] = random.random,
    ) -> None:
        self._providers = providers
        self._settings = settings or DispatchSettings()
        self._provider_settings = provider_settings or {}
        self._upstream_timeout_s = upstream_timeout_s
        self._clock = clock
        self._sleep = sleep
        self._random = random_
        self._breakers: dict[tuple[str, str], Breaker] = {}

    async def dispatch(
        self,
        request: ImageRequest,
        routes: Sequence[Route] | None = None,
        *,
        request_id: str = "",
        deadline: float | None = None,
    ) -> Dispatched:
        """The images of every call that succeeded, or the error that sums up the failures.

        `deadline` is the caller's, as time.monotonic(); the whole dispatch also ends
        within upstream_timeout_s, so a held reservation always outlives it.
        """
        return await self._run(self._job(request, routes, request_id, deadline))

    async def stream(
        self,
        request: ImageRequest,
        routes: Sequence[Route] | None = None,
        *,
        request_id: str = "",
        deadline: float | None = None,
    ) -> AsyncGenerator[Streamed, None]:
        """The events of every call as they come; then, if no call delivered an image,
        the error that sums up the failures. Closing the iterator cancels the calls."""
        queue: asyncio.Queue[Streamed | _Done] = asyncio.Queue()
        job = self._job(request, routes, request_id, deadline, sink=queue.put_nowait)
        task = asyncio.ensure_future(self._finish(job, queue))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Done):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _finish(self, job: _Job, queue: asyncio.Queue[Streamed | _Done]) -> None:
        try:
            await self._run(job)
        except Exception as exc:
            queue.put_nowait(_Done(exc))
        else:
            queue.put_nowait(_Done(None))

    def _job(
        self,
        request: ImageRequest,
        routes: Sequence[Route] | None,
        request_id: str,
        deadline: float | None,
        sink: Callable[[Streamed], None] | None = None,
    ) -> _Job:
        end = self._clock() + self._upstream_timeout_s
        caller_bound = deadline is not None and deadline < end
        if deadline is not None:
            end = min(end, deadline)
        return _Job(request, routes or request.model.routes, request_id, end, caller_bound, sink)

    async def _run(self, job: _Job) -> Dispatched:
        request, request_id = job.request, job.request_id
        outcome = await self._serve(job, request.n, 0)
        if not outcome.results:
            raise _summary(outcome.errors, request.model.id)
        delivered = sum(len(r.images) for r in outcome.results)
        if delivered < request.n:
            log.info(
                "request %s partial: %d of %d images (%s)",
                request_id,
                delivered,
                request.n,
                " ".join(e.args[0] for e in outcome.errors if e.args),
            )
        return Dispatched(outcome.results, outcome.errors)

    def health(self) -> list[RouteHealth]:
        """Breaker state per route that has been called (for `models`, metrics, console)."""
        now = self._clock()
        return [
            RouteHealth(
                provider,
                upstream_model,
                b.state.value,
                b.failures,
                max(0.0, b.opened_at + b.cooldown_s - now) if b.state is BreakerState.OPEN else 0.0,
            )
            for (provider, upstream_model), b in sorted(self._breakers.items())
        ]

    def serves(self, routes: Sequence[Route], name: str) -> bool:
        """Whether a live provider on one of `routes` has the operation (edit, variation)."""
        providers = (self._providers.get(r.provider) for r in routes)
        return any(p is not None and operation(p, name) is not None for p in providers)

    def breaker(self, route: Route) -> Breaker:
        key = route.key
        if key not in self._breakers:
            s = self._settings
            self._breakers[key] = Breaker(s.breaker_failures, s.breaker_cooldown_s)
        return self._breakers[key]

    async def _serve(self, job: _Job, count: int, start: int) -> _Outcome:
        """`count` images from routes[start:], failing over in order."""
        errors: list[Exception] = []
        for index in range(start, len(job.routes)):
            if job.end - self._clock() <= 0:
                break
            route = job.routes[index]
            provider = self._providers.get(route.provider)
            if provider is None or operation(provider, job.request.operation) is None:
                continue
            if self.breaker(route).paused(self._clock()):
                errors.append(_paused(route))
                continue
            cap = self._cap(route, provider)
            if count > cap:
                # Parallel calls on this route; each fails over on its own from here.
                parts = [cap] * (count // cap) + ([count % cap] if count % cap else [])
                outcomes = await _all(self._serve(job, part, index) for part in parts)
                merged = _Outcome(errors=errors)
                for outcome in outcomes:
                    merged.results += outcome.results
                    merged.errors += outcome.errors
                return merged
            try:
                result = await self._attempts(job, route, provider, count)
            except _AfterEvents as exc:
                # The caller has seen this call's events: no other call takes its place.
                delivered = exc.result.images
                done = [CallResult(route, count, delivered, exc.result.usage)] if delivered else []
                error = (
                    _naming(exc.error, route) if isinstance(exc.error, UpstreamError) else exc.error
                )
                return _Outcome(done, [*errors, error])
            except FINAL as exc:
                return _Outcome([], [*errors, exc])
            except UpstreamError as exc:
                errors.append(_naming(exc, route))
                continue
            return _Outcome([result], errors)
        return _Outcome([], errors)

    def _cap(self, route: Route, provider: Provider) -> int:
        cap = max(1, provider.max_n(route.upstream_model))
        return cap if route.max_n is None else min(cap, route.max_n)

    async def _attempts(
        self, job: _Job, route: Route, provider: Provider, count: int
    ) -> CallResult:
        """One call on one route, retried while retryable and the deadline allows."""
        breaker = self.breaker(route)
        if not breaker.allow(self._clock()):
            raise _paused(route)
        call = UpstreamCall(job.request, route.upstream_model, count, job.request_id)
        route_timeout = self._route_timeout(route)
        attempt = 0
        while True:
            attempt += 1
            left = job.end - self._clock()
            error: UpstreamError
            try:
                result = await self._once(provider, call, min(route_timeout, left), job, route)
            except _AfterEvents as exc:
                if isinstance(exc.error, FINAL):
                    breaker.success()
                elif isinstance(exc.error, _TimedOut) and _cut_short(job, left, route_timeout):
                    breaker.abandon()
                else:
                    breaker.failure(self._clock())
                raise
            except FINAL:
                breaker.success()  # the route answered; the request is what failed
                raise
            except _TimedOut as exc:
                if _cut_short(job, left, route_timeout):
                    # The caller's own deadline cut it short: no verdict on the route.
                    breaker.abandon()
                    raise _CallerDeadline(exc.message) from None
                error = exc
            except UpstreamError as exc:
                error = exc
            except BaseException:
                breaker.abandon()
                raise
            else:
                breaker.success()
                return CallResult(route, count, result.images[:count], result.usage)
            breaker.failure(self._clock())
            log.info(
                "request %s route %s attempt %d failed: %s",
                job.request_id,
                route.label,
                attempt,
                error.message,
            )
            if not error.retryable or attempt >= self._settings.max_attempts:
                raise error
            delay = self._backoff(attempt) if error.retry_after_s is None else error.retry_after_s
            if delay >= job.end - self._clock():
                raise error  # no time to wait for this route: the next one may answer now
            await self._sleep(delay)
            if not breaker.allow(self._clock()):
                raise error

    async def _once(
        self, provider: Provider, call: UpstreamCall, limit: float, job: _Job, route: Route
    ) -> ProviderResult:
        relay = None if job.sink is None else _Relay(job.sink, next(job.attempts), route)
        with upstream_observed(provider.id, call, timed_out=_TimedOut) as seen:
            try:
                try:
                    async with asyncio.timeout(max(limit, 0.0)):
                        if relay is None:
                            run = operation(provider, call.request.operation)
                            assert run is not None, "_serve skips routes that cannot serve it"
                            result = await run(call)
                        else:
                            result = await relay.run(provider, call)
                except TimeoutError:
                    raise _TimedOut(
                        f"The upstream provider '{provider.id}' did not answer within "
                        f"{limit:.3g} s.",
                        retryable=True,
                    ) from None
                if not result.images:
                    raise UpstreamError(
                        f"The upstream provider '{provider.id}' returned no images."
                    )
            except (UpstreamError, *FINAL) as exc:
                if relay is not None and relay.sent:
                    raise _AfterEvents(exc, relay.result()) from exc
                raise
            seen.images = len(result.images[: call.n])
            return result

    def _route_timeout(self, route: Route) -> float:
        settings = self._provider_settings.get(route.provider)
        return settings.timeout_s if settings is not None else math.inf

    def _backoff(self, attempt: int) -> float:
        s = self._settings
        return float(self._random() * min(s.backoff_max_s, s.backoff_base_s * 2.0 ** (attempt - 1)))


class _TimedOut(UpstreamError):
    """An attempt ran out of time (retryable: the route may answer faster next time)."""


class _CallerDeadline(_TimedOut):
    """An attempt that the caller's deadline, not the route's timeout, ended."""


def _cut_short(job: _Job, left: float, route_timeout: float) -> bool:
    """Whether an attempt that timed out was given the caller's remaining time, not
    its route's timeout."""
    return job.caller_bound and left < route_timeout


class _AfterEvents(Exception):
    """A streamed call failed after passing events on: final for it, never retried."""

    def __init__(self, error: Exception, result: ProviderResult) -> None:
        super().__init__(*error.args)
        self.error = error
        # What it did deliver before failing.
        self.result = result


class _Relay:
    """Passes one streamed call's events on as they come, and remembers what it passed."""

    def __init__(self, sink: Callable[[Streamed], None], attempt: int, route: Route) -> None:
        self._sink = sink
        self._attempt = attempt
        self._route = route
        self.sent = False
        self._images: list[GeneratedImage] = []
        self._usage = TokenUsage()

    async def run(self, provider: Provider, call: UpstreamCall) -> ProviderResult:
        stream = events(provider, call)
        try:
            async for event in stream:
                if isinstance(event, CompletedImage):
                    if len(self._images) >= call.n:
                        continue  # extra images are neither sent nor charged
                    self._images.append(event.image)
                    self._usage += event.usage
                elif call.n > 1 or event.index >= call.request.partial_images:
                    continue  # previews the caller did not ask for
                self._sink(Streamed(self._attempt, self._route, event))
                self.sent = True
        finally:
            # Stop the upstream stream now (cancelled, timed out) rather than when collected.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return self.result()

    def result(self) -> ProviderResult:
        return ProviderResult(list(self._images), self._usage)


def events(provider: Provider, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
    """The provider's own stream for the operation (`stream` for generations, an optional
    `stream_edit` for edits), or its one answer as completed events."""
    kind = call.request.operation
    if kind == GENERATE and isinstance(provider, StreamingProvider):
        return provider.stream(call)
    if kind == EDIT:
        stream_edit = getattr(provider, "stream_edit", None)
        if callable(stream_edit):
            streamed: AsyncIterator[StreamEvent] = stream_edit(call)
            return streamed
    return generated_events(provider, call)


def _naming(error: UpstreamError, route: Route) -> UpstreamError:
    """The error, with a message that names its provider (the caller's 502 must say who)."""
    if f"'{route.provider}'" in error.message:
        return error
    return UpstreamError(f"The upstream provider '{route.provider}' failed: {error.message}")


def _paused(route: Route) -> UpstreamError:
    return UpstreamError(
        f"The upstream provider '{route.provider}' is paused for '{route.upstream_model}' "
        "after repeated failures."
    )


def _summary(errors: list[Exception], model_id: str) -> Exception:
    """The one error for a request whose every call failed: safety first, then the request."""
    for kind in FINAL:
        for error in errors:
            if isinstance(error, kind):
                return error
    if any(isinstance(error, _CallerDeadline) for error in errors):
        # Out of time: what the caller gets when gRPC's own deadline passes first.
        return DeadlineExceeded()
    messages = list(dict.fromkeys(e.args[0] for e in errors if e.args))
    if len(messages) == 1:
        return errors[0]
    if not messages:
        return UpstreamError(f"No upstream provider could be reached for model '{model_id}'.")
    return UpstreamError(" ".join(messages))


async def _all(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """gather() that also cancels the siblings when one raises (a bug, or cancellation)."""
    tasks: list[asyncio.Task[T]] = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
