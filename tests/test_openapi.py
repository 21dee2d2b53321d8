"""The OpenAPI document (gateway/openapi.json): valid, complete, true to the proto, served alike."""

from __future__ import annotations

import json
import re
from typing import Any

from google.api import annotations_pb2
from imagegate.v1 import accounts_pb2, admin_pb2, images_pb2
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from gateway import app, errors
from tests.conftest import Tenant
from tests.envoy_harness import REPO
from tests.rest import call

DOC: dict[str, Any] = json.loads((REPO / "gateway" / "openapi.json").read_text())
SCHEMAS = DOC["components"]["schemas"]


def test_document_is_valid_openapi() -> None:
    validate(DOC)


def test_paths_are_the_routes_of_both_fronts() -> None:
    documented = {
        (re.sub(r"\{[^}]+\}", "x", path), method.upper())
        for path, ops in DOC["paths"].items()
        for method in ops
    }
    # Each route of gateway/app.py (and so of Envoy's Lua, tests/test_envoy_config.py).
    for pattern, method in app.ROUTES:
        matches = {d for d in documented if re.search(pattern, d[0]) and d[1] == method}
        assert len(matches) == 1, (pattern, method)
    assert len(documented) == len(app.ROUTES)


def test_every_public_http_rule_of_the_proto_is_documented() -> None:
    public = 0
    for method in (
        *images_pb2.DESCRIPTOR.services_by_name["ImageService"].methods,
        *admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods,
    ):
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        path = getattr(rule, verb)
        example = re.sub(r"\{[^}]+\}", "x", path)
        if not any(re.search(pattern, example) for pattern, _ in app.ROUTES):
            continue  # internal (the streaming rule): both fronts answer 404 to it
        public += 1
        assert verb in DOC["paths"][path], method.name
    assert public >= 4 + 11


def test_schemas_have_the_proto_fields() -> None:
    for name in (
        "GenerateImagesRequest",
        "ImagesResponse",
        "Image",
        "Usage",
        "InputTokensDetails",
        "Model",
        "ModelList",
        "Balance",
        "UsageRecord",
        "UsageList",
    ):
        fields = {f.name for f in images_pb2.DESCRIPTOR.message_types_by_name[name].fields}
        assert set(SCHEMAS[name]["properties"]) == fields, name
    for module in (accounts_pb2, admin_pb2):
        for name, message in module.DESCRIPTOR.message_types_by_name.items():
            if name in SCHEMAS:
                assert set(SCHEMAS[name]["properties"]) == {f.name for f in message.fields}, name
    assert {"KeyInfo", "UsageBucketList", "AccountDetail", "ModelInfoList"} <= set(SCHEMAS)


def test_every_error_status_is_documented() -> None:
    statuses = {
        row.status
        for row in (*vars(errors).values(), *errors.BY_REASON.values())
        if isinstance(row, errors.Row)
    }
    documented = {
        int(status)
        for ops in DOC["paths"].values()
        for op in ops.values()
        for status in op["responses"]
    }
    assert statuses <= documented


def _validator(name: str) -> OAS31Validator:
    # The components ride along, so "#/components/schemas/..." resolves in the root.
    return OAS31Validator({"$ref": f"#/components/schemas/{name}", "components": DOC["components"]})


async def test_answers_match_the_document(base_url: str, tenant: Tenant) -> None:
    reply = await call("GET", base_url + "/openapi.json")
    assert (reply.status, reply.headers["Content-Type"]) == (200, "application/json")
    assert reply.body == (REPO / "gateway" / "openapi.json").read_bytes()
    assert reply.headers["x-request-id"]
    generated = await call(
        "POST",
        base_url + "/v1/images/generations",
        key=tenant.key,
        json_body={"model": "local", "prompt": "a kite", "size": "256x256", "n": 2},
    )
    _validator("ImagesResponse").validate(generated.json())
    models = await call("GET", base_url + "/v1/models", key=tenant.key)
    _validator("ModelList").validate(models.json())
    model = await call("GET", base_url + "/v1/models/local", key=tenant.key)
    _validator("Model").validate(model.json())
    balance = await call("GET", base_url + "/v1/balance", key=tenant.key)
    _validator("Balance").validate(balance.json())
    usage = await call("GET", base_url + "/v1/usage?limit=1", key=tenant.key)
    _validator("UsageList").validate(usage.json())
    assert usage.json()["data"]
    refused = await call("POST", base_url + "/v1/images/generations", key=tenant.key, body=b"{")
    _validator("Error").validate(refused.json())
