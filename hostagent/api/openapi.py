"""The OpenAPI 3.1 document of the v1 API, generated from api.ROUTES and the models.

``python -m hostagent.api.openapi > docs/openapi.json`` refreshes the checked-in
copy; a unit test fails when it is stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hostagent import __version__
from hostagent.api.models import ID_PATTERN, ErrorBody
from hostagent.api.server import ROUTES
from hostagent.errors import Forbidden

REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _forbidden() -> dict[str, Any]:
    """Peer authentication answers every path, even those outside ROUTES."""
    return {
        str(Forbidden.status): {
            "description": f"error: {Forbidden.code}",
            "content": {"application/json": {"schema": _ref(ErrorBody)}},
        }
    }


def build_openapi() -> dict[str, Any]:
    requests = {route.request for route in ROUTES if route.request}
    replies = {ErrorBody} | {m for route in ROUTES for m in route.responses.values()}
    _, schemas = models_json_schema(
        [(m, "validation") for m in sorted(requests, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(replies, key=lambda m: m.__name__)],
        ref_template=REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "responses": {},
        }
        if "{attachment_id}" in route.path:
            operation["parameters"] = [
                {
                    "name": "attachment_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                }
            ]
        for name, description in route.query.items():
            operation.setdefault("parameters", []).append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "description": description,
                    "schema": {"type": "string"},
                }
            )
        if route.request:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(route.request)}},
            }
        for status, model in sorted(route.responses.items()):
            operation["responses"][str(status)] = {
                "description": model.__doc__.strip().splitlines()[0] if model.__doc__ else "OK",
                "content": {"application/json": {"schema": _ref(model)}},
            }
        for status, codes in sorted(route.error_codes().items()):
            operation["responses"][str(status)] = {
                "description": "error: " + ", ".join(codes),
                "content": {"application/json": {"schema": _ref(ErrorBody)}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format)",
            "responses": {
                "200": {
                    "description": "metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_forbidden(),
            },
        }
    }
    paths["/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "the OpenAPI document",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_forbidden(),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hostagent",
            "version": __version__,
            "description": "Attach shared block volumes to libvirt guests; see API.md.",
        },
        "paths": paths,
        "components": {"schemas": schemas["$defs"]},
    }


def main() -> None:
    json.dump(build_openapi(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
