"""The checked-in OpenAPI document is the one the daemon serves."""

from __future__ import annotations

import json
from pathlib import Path

from hostagent.api.openapi import build_openapi
from hostagent.api.server import ROUTES, ApiHandlers
from hostagent.errors import HostagentError

CHECKED_IN = Path(__file__).parents[2] / "docs" / "openapi.json"


def test_checked_in_openapi_is_current() -> None:
    assert json.loads(CHECKED_IN.read_text()) == build_openapi(), (
        "docs/openapi.json is stale: python -m hostagent.api.openapi > docs/openapi.json"
    )


def test_every_api_md_endpoint_is_documented() -> None:
    paths = build_openapi()["paths"]
    expected = {
        ("/v1/attachments/{attachment_id}", "put"),
        ("/v1/attachments/{attachment_id}", "delete"),
        ("/v1/attachments/{attachment_id}", "get"),
        ("/v1/attachments", "get"),
        ("/v1/connections", "get"),
        ("/v1/health", "get"),
        ("/v1/reconcile", "post"),
        ("/v1/connector", "get"),
        ("/metrics", "get"),
    }
    documented = {(path, method) for path, ops in paths.items() for method in ops}
    assert expected <= documented, "API.md is fixed: every endpoint stays"
    assert len(ROUTES) + 2 == len(documented), "ROUTES plus /metrics and the document itself"
    put = paths["/v1/attachments/{attachment_id}"]["put"]
    assert set(put["responses"]) == {
        *("200", "201", "400", "403", "404", "408", "409", "413", "502", "503"),
    }
    assert all("403" in op["responses"] for ops in paths.values() for op in ops.values())
    assert "volume_not_multiattach" in put["responses"]["409"]["description"]


def _error_classes(base: type[HostagentError] = HostagentError) -> list[type[HostagentError]]:
    return [base, *(c for sub in base.__subclasses__() for c in _error_classes(sub))]


def test_each_error_code_is_one_error_class() -> None:
    codes = [error.code for error in _error_classes()]
    assert len(codes) == len(set(codes))


def test_routes_document_their_error_classes_and_handlers() -> None:
    paths = build_openapi()["paths"]
    for route in ROUTES:
        operation = paths[route.path][route.method.lower()]
        assert getattr(ApiHandlers, operation["operationId"]) is route.handler
        for error in route.errors:
            description = operation["responses"][str(error.status)]["description"]
            assert error.code in description.removeprefix("error: ").split(", ")
