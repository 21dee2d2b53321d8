"""Dispatch policy with scripted providers: split, retry, backoff, failover, breaker, deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.catalog import Catalog, DispatchSettings, ModelSpec, ProviderSettings, Route
from service.errors import ContentPolicy, DeadlineExceeded, UpstreamError, UpstreamRejected
from service.providers.dispatch import Dispatcher
from service.requests import GenerationParams, ImageRequest, validate
from tests.fakes.scripted import OK, ScriptedProvider, Step, fail, refuse, reject

A = Route("a", "model-a")
B = Route("b", "model-b")
SETTINGS = DispatchSettings(
    max_attempts=3,
    backoff_base_s=1.0,
    backoff_max_s=3.0,
    breaker_failures=3,
    breaker_cooldown_s=30.0,
)


def spec(*routes: Route) -> ModelSpec:
    return ModelSpec(
        id="m",
        provider=routes[0].provider,
        upstream_model=routes[0].upstream_model,
        sizes=("256x256",),
        default_size="256x256",
        qualities=("standard",),
        default_quality="standard",
        prices={("256x256", "standard"): 1000},
        n_max=10,
        routes=routes,
    )


def request(*routes: Route, n: int = 1) -> ImageRequest:
    return validate(GenerationParams(prompt="p", n=n), Catalog({"m": spec(*routes)}), "m")


class Time:
    """A monotonic clock the test moves, and a sleep that moves it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def dispatcher(
    t: Time, settings: DispatchSettings = SETTINGS, **providers: ScriptedProvider
) -> Dispatcher:
    return Dispatcher(
        providers,
        settings,
        upstream_timeout_s=60,
        clock=t,
        sleep=t.sleep,
        random_=lambda: 0.5,
    )


async def test_n_is_split_by_the_smaller_of_route_and_adapter_caps() -> None:
    a = ScriptedProvider("a", max_n=4)
    d = dispatcher(Time(), a=a)
    result = await d.dispatch(request(Route("a", "model-a", max_n=2), n=5))
    assert sorted(c.n for c in a.calls) == [1, 2, 2]
    assert len(result.images) == 5 and len(result.calls) == 3
    a2 = ScriptedProvider("a", max_n=4)
    await dispatcher(Time(), a=a2).dispatch(request(A, n=5))
    assert sorted(c.n for c in a2.calls) == [1, 4]


async def test_retryable_errors_are_retried_with_full_jitter_backoff() -> None:
    t = Time()
    a = ScriptedProvider("a").then(fail(), fail(), OK)
    result = await dispatcher(t, a=a).dispatch(request(A))
    assert len(result.images) == 1 and len(a.calls) == 3
    # random() = 0.5 of min(max, base * 2**k): 0.5 * 1, then 0.5 * 2.
    assert t.sleeps == [0.5, 1.0]


async def test_backoff_is_capped_by_backoff_max() -> None:
    t = Time()
    settings = DispatchSettings(max_attempts=5, backoff_base_s=1.0, backoff_max_s=3.0)
    a = ScriptedProvider("a").then(fail(), fail(), fail(), OK)
    await dispatcher(t, settings, a=a).dispatch(request(A))
    assert t.sleeps == [0.5, 1.0, 1.5]


async def test_retry_after_is_honoured() -> None:
    t = Time()
    a = ScriptedProvider("a").then(fail(retry_after_s=7.0), OK)
    await dispatcher(t, a=a).dispatch(request(A))
    assert t.sleeps == [7.0]


async def test_retry_after_beyond_the_deadline_fails_over_at_once() -> None:
    t = Time()
    a = ScriptedProvider("a").then(fail(retry_after_s=120.0))
    b = ScriptedProvider("b")
    result = await dispatcher(t, a=a, b=b).dispatch(request(A, B), deadline=t.now + 30)
    assert t.sleeps == [] and len(a.calls) == 1 and len(b.calls) == 1
    assert [c.route for c in result.calls] == [B]


async def test_non_retryable_error_fails_over_without_retrying() -> None:
    a = ScriptedProvider("a").then(fail(retryable=False))
    b = ScriptedProvider("b")
    result = await dispatcher(Time(), a=a, b=b).dispatch(request(A, B))
    assert len(a.calls) == 1 and len(b.calls) == 1
    assert result.calls[0].route == B


async def test_max_attempts_then_failover() -> None:
    a = ScriptedProvider("a")
    a.default = fail()
    b = ScriptedProvider("b")
    result = await dispatcher(Time(), a=a, b=b).dispatch(request(A, B))
    assert len(a.calls) == SETTINGS.max_attempts and len(b.calls) == 1
    assert result.calls[0].route == B


@pytest.mark.parametrize(
    ("step", "error"), [(refuse(), ContentPolicy), (reject(), UpstreamRejected)]
)
async def test_safety_refusal_and_rejected_request_are_final(step: Step, error: type) -> None:
    t = Time()
    a = ScriptedProvider("a").then(step)
    b = ScriptedProvider("b")
    d = dispatcher(t, a=a, b=b)
    with pytest.raises(error):
        await d.dispatch(request(A, B))
    assert len(a.calls) == 1 and b.calls == [] and t.sleeps == []
    # Not a breaker failure: the route answered.
    assert d.breaker(A).failures == 0


async def test_every_route_failing_is_a_502_naming_the_providers() -> None:
    a = ScriptedProvider("a")
    a.default = Step(error=UpstreamError("The upstream provider 'a' failed with HTTP 500"))
    b = ScriptedProvider("b")
    b.default = Step(error=UpstreamError("The upstream provider 'b' timed out."))
    with pytest.raises(UpstreamError) as raised:
        await dispatcher(Time(), a=a, b=b).dispatch(request(A, B))
    assert "'a'" in raised.value.message and "'b'" in raised.value.message


async def test_safety_wins_over_other_failures_when_nothing_succeeded() -> None:
    # n=2 on a one-per-call route: one call refused for safety, the other failing.
    a = ScriptedProvider("a", max_n=1).then(refuse(), fail(retryable=False))
    with pytest.raises(ContentPolicy):
        await dispatcher(Time(), a=a).dispatch(request(A, n=2))
    a = ScriptedProvider("a", max_n=1).then(fail(retryable=False), reject())
    with pytest.raises(UpstreamRejected):
        await dispatcher(Time(), a=a).dispatch(request(A, n=2))


async def test_partial_success_delivers_what_succeeded() -> None:
    a = ScriptedProvider("a", max_n=1).then(OK, fail(retryable=False), OK)
    result = await dispatcher(Time(), a=a).dispatch(request(A, n=3))
    assert len(result.images) == 2 and len(result.calls) == 2
    assert len(result.failures) == 1


async def test_failover_splits_again_for_a_route_with_a_smaller_cap() -> None:
    a = ScriptedProvider("a", max_n=4)
    a.default = fail(retryable=False)
    b = ScriptedProvider("b", max_n=1)
    result = await dispatcher(Time(), a=a, b=b).dispatch(request(A, B, n=3))
    assert [c.n for c in a.calls] == [3] and [c.n for c in b.calls] == [1, 1, 1]
    assert len(result.images) == 3


async def test_extra_images_are_cut_per_call_and_empty_replies_fail_over() -> None:
    a = ScriptedProvider("a").then(Step(images=5))
    result = await dispatcher(Time(), a=a).dispatch(request(A, n=2))
    assert len(result.images) == 2
    a = ScriptedProvider("a").then(Step(images=0))
    b = ScriptedProvider("b")
    result = await dispatcher(Time(), a=a, b=b).dispatch(request(A, B))
    assert len(a.calls) == 1 and result.calls[0].route == B


async def test_breaker_opens_skips_then_probes_and_closes() -> None:
    t = Time()
    a = ScriptedProvider("a")
    a.default = fail(retryable=False)
    b = ScriptedProvider("b")
    d = dispatcher(t, a=a, b=b)
    for _ in range(SETTINGS.breaker_failures):
        await d.dispatch(request(A, B))
    assert len(a.calls) == 3 and d.breaker(A).state.value == "open"
    health = {(h.provider, h.upstream_model): h for h in d.health()}
    assert health["a", "model-a"].state == "open" and health["a", "model-a"].retry_in_s == 30
    # Open: skipped without a call.
    await d.dispatch(request(A, B))
    assert len(a.calls) == 3 and len(b.calls) == 4
    # After the cooldown one probe goes through; its success closes the breaker.
    t.now += SETTINGS.breaker_cooldown_s
    a.default = OK
    result = await d.dispatch(request(A, B))
    assert len(a.calls) == 4 and result.calls[0].route == A
    assert d.breaker(A).state.value == "closed"


async def test_failed_probe_opens_the_breaker_again() -> None:
    t = Time()
    a = ScriptedProvider("a")
    a.default = fail()
    b = ScriptedProvider("b")
    d = dispatcher(t, a=a, b=b)
    await d.dispatch(request(A, B))  # three attempts: open
    assert d.breaker(A).state.value == "open"
    t.now += SETTINGS.breaker_cooldown_s
    await d.dispatch(request(A, B))
    # One probe (no retries once it re-opened), then straight to b.
    assert len(a.calls) == 4 and d.breaker(A).state.value == "open"
    await d.dispatch(request(A, B))
    assert len(a.calls) == 4


async def test_half_open_lets_exactly_one_probe_through() -> None:
    t = Time()
    a = ScriptedProvider("a")
    a.default = fail(retryable=False)
    b = ScriptedProvider("b")
    d = dispatcher(t, a=a, b=b)
    for _ in range(3):
        await d.dispatch(request(A, B))
    t.now += SETTINGS.breaker_cooldown_s
    a.default = Step(delay_s=0.05)
    # Three parallel requests: one probes a, two go straight to b.
    results = await asyncio.gather(*(d.dispatch(request(A, B)) for _ in range(3)))
    assert sorted(r.calls[0].route.provider for r in results) == ["a", "b", "b"]
    assert len(a.calls) == 4


async def test_cancelled_probe_lets_the_next_call_probe() -> None:
    t = Time()
    a = ScriptedProvider("a")
    a.default = fail(retryable=False)
    d = dispatcher(t, a=a)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await d.dispatch(request(A))
    t.now += SETTINGS.breaker_cooldown_s
    a.default = Step(delay_s=10)
    task = asyncio.create_task(d.dispatch(request(A)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    a.default = OK
    assert len((await d.dispatch(request(A))).images) == 1


async def test_paused_only_route_is_an_upstream_error_naming_it() -> None:
    t = Time()
    a = ScriptedProvider("a")
    a.default = fail(retryable=False)
    d = dispatcher(t, a=a)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await d.dispatch(request(A))
    with pytest.raises(UpstreamError, match="'a' is paused"):
        await d.dispatch(request(A))
    assert len(a.calls) == 3


async def test_caller_deadline_stops_retries_and_failover() -> None:
    a = ScriptedProvider("a")
    a.default = Step(delay_s=5)
    b = ScriptedProvider("b")
    d = Dispatcher({"a": a, "b": b}, SETTINGS, upstream_timeout_s=60)
    # The 504 gRPC answers when a deadline passes, not an upstream failure (502).
    with pytest.raises(DeadlineExceeded, match="timed out before the images were ready"):
        await d.dispatch(request(A, B), deadline=time.monotonic() + 0.05)
    assert len(a.calls) == 1 and b.calls == []
    # The caller's impatience says nothing about the route.
    assert d.breaker(A).failures == 0


async def test_provider_timeout_is_a_retryable_route_failure() -> None:
    a = ScriptedProvider("a")
    a.default = Step(delay_s=5)
    b = ScriptedProvider("b")
    d = Dispatcher(
        {"a": a, "b": b},
        DispatchSettings(max_attempts=2, backoff_base_s=0.001, backoff_max_s=0.001),
        provider_settings={"a": ProviderSettings("a", "openai", timeout_s=0.02)},
        upstream_timeout_s=60,
    )
    result = await d.dispatch(request(A, B))
    assert len(a.calls) == 2 and result.calls[0].route == B
    assert d.breaker(A).failures == 2


async def test_an_adapter_bug_is_not_hidden_and_cancels_the_sibling_calls() -> None:
    a = ScriptedProvider("a", max_n=1).then(Step(error=RuntimeError("bug")), Step(delay_s=10))
    task = asyncio.create_task(Dispatcher({"a": a}).dispatch(request(A, n=2)))
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(task, 5)
