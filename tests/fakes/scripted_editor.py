"""The scripted provider (tests/fakes/scripted.py) that also edits and makes variations,
answering from the same script; it records each call, input images included."""

from __future__ import annotations

from service.providers.base import AdapterDeps, ProviderResult, ProviderSettings, UpstreamCall
from service.providers.http import credential
from tests.fakes.scripted import DEFAULT_ENV, ScriptedProvider


class ScriptedEditor(ScriptedProvider):
    async def edit(self, call: UpstreamCall) -> ProviderResult:
        return await self.generate(call)

    async def variation(self, call: UpstreamCall) -> ProviderResult:
        return await self.generate(call)


def create(settings: ProviderSettings, deps: AdapterDeps) -> ScriptedEditor:
    credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return ScriptedEditor(settings.id, int(settings.options.get("max_n", "10")))
