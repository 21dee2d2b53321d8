"""The registry: one adapter per declared provider, built from settings and the environment."""

from __future__ import annotations

import logging
import threading
from types import ModuleType

import pytest
from aiohttp import web

from service.catalog import ProviderSettings
from service.errors import UpstreamError
from service.providers.base import AdapterDeps
from service.providers.local import LocalProvider
from service.providers.registry import KIND_MODULES, build_registry
from tests.fakes.base import FakeUpstream, image_bytes
from tests.fakes.scripted import ScriptedProvider

SECRET = "sk-upstream-secret-value-123"
SCRIPTED = {**KIND_MODULES, "openai_compatible": "tests.fakes.scripted"}


def settings(provider_id: str, kind: str = "openai_compatible", **kw: object) -> ProviderSettings:
    return ProviderSettings(provider_id, kind, **kw)  # type: ignore[arg-type]


async def test_missing_credential_is_one_line_naming_the_variable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    declared = {
        "with": settings("with", api_key_env="KEY_A"),
        "without": settings("without", api_key_env="KEY_B"),
        "local": settings("local", "local"),
    }
    with caplog.at_level(logging.DEBUG):
        registry = await build_registry(declared, {"KEY_A": SECRET}, kind_modules=SCRIPTED)
    try:
        assert registry.live == {"with", "local"}
        assert isinstance(registry.providers["local"], LocalProvider)
        status = registry.status["without"]
        assert not status.live and status.missing == "KEY_B is not set"
        lines = [r.getMessage() for r in caplog.records if "without" in r.getMessage()]
        assert lines == ["provider without (openai_compatible) is not live: KEY_B is not set"]
        assert SECRET not in caplog.text
    finally:
        await registry.aclose()


async def test_a_kind_whose_adapter_is_missing_does_not_stop_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_such_module(name: str) -> ModuleType:
        raise ImportError(f"No module named {name!r}")

    with caplog.at_level(logging.WARNING):
        registry = await build_registry(
            {"bfl": settings("bfl", "bfl")}, {}, import_module=no_such_module
        )
    assert registry.live == frozenset()
    assert "not available" in registry.status["bfl"].missing
    assert "provider bfl is not live" in caplog.text


async def test_an_adapter_that_cannot_be_built_is_reported_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = ModuleType("broken")

    def create(s: ProviderSettings, deps: AdapterDeps) -> ScriptedProvider:
        raise ValueError(f"project is not set (key {deps.env['KEY']})")

    module.create = create  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR):
        registry = await build_registry(
            {"v": settings("v", "vertex")}, {"KEY": SECRET}, import_module=lambda _: module
        )
    assert not registry.status["v"].live
    assert "project is not set" in registry.status["v"].missing
    assert SECRET not in registry.status["v"].missing and SECRET not in caplog.text


async def test_factories_run_off_the_event_loop() -> None:
    # Credential chains (AWS, Google ADC) may wait on metadata servers: never on the loop.
    threads: list[int] = []
    module = ModuleType("capture")

    def create(s: ProviderSettings, deps: AdapterDeps) -> ScriptedProvider:
        threads.append(threading.get_ident())
        return ScriptedProvider(s.id)

    module.create = create  # type: ignore[attr-defined]
    registry = await build_registry(
        {"b": settings("b", "bedrock")}, {}, import_module=lambda _: module
    )
    try:
        assert registry.live == {"b"}
        assert threads and threads[0] != threading.get_ident()
    finally:
        await registry.aclose()


async def test_each_provider_gets_its_own_session_timeout_and_download_hosts() -> None:
    built: list[AdapterDeps] = []
    module = ModuleType("capture")

    def create(s: ProviderSettings, deps: AdapterDeps) -> ScriptedProvider:
        built.append(deps)
        return ScriptedProvider(s.id)

    module.create = create  # type: ignore[attr-defined]
    declared = {
        "near": settings("near", timeout_s=7.0, download_hosts=("127.0.0.1",)),
        "far": settings("far", timeout_s=9.0),
    }
    registry = await build_registry(declared, {}, import_module=lambda _: module)
    adapters = list(registry.providers.values())
    fake = ImageHost()
    await fake.start()
    try:
        near, far = built
        assert near.http is not far.http
        assert (near.http.timeout.total, far.http.timeout.total) == (7.0, 9.0)
        url = fake.base_url + "/img.png"
        assert (await near.download.fetch(url))[1] == "image/png"
        with pytest.raises(UpstreamError, match="not allowed"):
            await far.download.fetch(url)
    finally:
        await fake.stop()
        await registry.aclose()
    # Sessions and adapters are closed with the registry.
    assert near.http.closed and far.http.closed
    assert all(isinstance(a, ScriptedProvider) and a.closed for a in adapters)


class ImageHost(FakeUpstream):
    def routes(self, app: web.Application) -> None:
        async def image(request: web.Request) -> web.Response:
            return web.Response(body=image_bytes(), content_type="image/png")

        app.router.add_get("/img.png", image)
