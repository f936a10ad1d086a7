"""HTTP routes of the v1 API (API.md) over aiohttp: parse, call the service, reply.

No logic lives here (the middlewares every route runs through are
``api.middlewares``). Blocking service calls (libvirt, os-brick, sqlite) run
in a thread pool so one slow detach never stalls the event loop. Every error
leaves as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from hostagent import __version__
from hostagent.api.middlewares import (
    MAX_BODY_BYTES,
    VALID_ID,
    body_limit_middleware,
    error_middleware,
    model_response,
    read_body,
)
from hostagent.api.models import (
    Attachment,
    AttachmentList,
    AttachRequest,
    ConnectionList,
    ConnectorProperties,
    DetachResult,
    DoctorReport,
    ExtendRequest,
    ExtendResult,
    Health,
    LibvirtView,
    ReconcileReport,
    describe_validation_error,
)
from hostagent.api.peer_auth import PeerPolicy, peer_auth_middleware
from hostagent.api.views import ReadViews
from hostagent.attachments.extend import VolumeExtender
from hostagent.attachments.reconcile import Reconciler
from hostagent.attachments.service import AttachmentService
from hostagent.errors import (
    AttachmentConflict,
    AttachmentIdReused,
    AttachmentNotFound,
    ConnectFailed,
    DetachTimeout,
    DeviceNotExtended,
    DisconnectFailed,
    DomainExists,
    DomainMigrating,
    DomainNotFound,
    ExtendFailed,
    Forbidden,
    HostagentError,
    InvalidRequest,
    LibvirtError,
    LibvirtUnavailable,
    MigrationNotFinished,
    RequestTimeout,
    RequestTooLarge,
    TargetDevInUse,
    VolumeAlreadyAttached,
    VolumeNotMultiattach,
)
from hostagent.observability import logctx
from hostagent.observability.metrics import Metrics

LOG = logging.getLogger(__name__)

T = TypeVar("T")

# A route's handler is an ApiHandlers method, named by the method itself (not by a
# string), so a route with no handler fails the type check and the import.
RouteHandler = Callable[["ApiHandlers", web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    """One endpoint, declared once: aiohttp serves it and openapi documents it."""

    method: str
    path: str
    handler: RouteHandler
    summary: str
    request: type[BaseModel] | None = None
    responses: dict[int, type[BaseModel]] = field(default_factory=dict)
    errors: tuple[type[HostagentError], ...] = ()
    query: dict[str, str] = field(default_factory=dict)  # name -> description

    @property
    def operation_id(self) -> str:
        return self.handler.__name__

    def error_codes(self) -> dict[int, tuple[str, ...]]:
        """Every error code this route answers with, by status, in declared order
        (the ones every route answers with first)."""
        by_status: dict[int, tuple[str, ...]] = {}
        for error in (*EVERY_ROUTE_ERRORS, *self.errors):
            by_status[error.status] = (*by_status.get(error.status, ()), error.code)
        return by_status


# The middlewares answer these on any route: peer_auth, read_body, body_limit.
EVERY_ROUTE_ERRORS: tuple[type[HostagentError], ...] = (
    Forbidden,
    RequestTimeout,
    RequestTooLarge,
)


def _connector_properties(
    *, target: str | None, host: str, my_ip: str | None, multipath: bool, rbd_local_attach: bool
) -> ConnectorProperties:
    """connector_props imported on first use, in the worker thread: its route
    lookup (pyroute2) is start-up time that no request but this one needs."""
    from hostagent.api.connector_props import connector_properties  # noqa: PLC0415

    return connector_properties(
        target=target,
        host=host,
        my_ip=my_ip,
        multipath=multipath,
        rbd_local_attach=rbd_local_attach,
    )


class ApiHandlers:
    """aiohttp handlers bound to the service, the reconciler and a thread pool."""

    def __init__(
        self,
        service: AttachmentService,
        reconciler: Reconciler,
        executor: ThreadPoolExecutor,
        openapi: dict[str, Any],
        *,
        views: ReadViews,
        metrics: Metrics,
        libvirt_connected: Callable[[], bool],
        connector_host: str,
        connector_my_ip: str | None,
        connector_multipath: bool = False,
        connector_rbd_local_attach: bool = False,
        extender: VolumeExtender,
    ) -> None:
        self.metrics = metrics
        self.libvirt_connected = libvirt_connected
        self.extender = extender
        self.connector_host = connector_host
        self.connector_my_ip = connector_my_ip
        self.connector_multipath = connector_multipath
        self.connector_rbd_local_attach = connector_rbd_local_attach
        self.service = service
        self.reconciler = reconciler
        self.views = views
        self.executor = executor
        self.openapi = openapi

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work in the pool, in this request's log context."""
        loop = asyncio.get_running_loop()
        work = functools.partial(fn, *args)
        return await loop.run_in_executor(self.executor, contextvars.copy_context().run, work)

    @staticmethod
    def _attachment_id(request: web.Request) -> str:
        attachment_id = request.match_info["attachment_id"]
        if not VALID_ID.fullmatch(attachment_id):
            raise InvalidRequest(
                f"attachment_id {attachment_id[:80]!r} must be 1-64 chars of [A-Za-z0-9_-]"
            )
        return attachment_id

    @staticmethod
    async def _body(request: web.Request, model: type[T]) -> T:
        raw = await read_body(request)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # a megabyte of "[" is JSON nested deeper than Python goes
            raise InvalidRequest("request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        try:
            return model.model_validate(data)  # type: ignore[attr-defined, no-any-return]
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None

    async def put_attachment(self, request: web.Request) -> web.Response:
        attachment_id = self._attachment_id(request)
        body = await self._body(request, AttachRequest)
        logctx.note(volume_id=body.volume_id)
        try:
            attachment, created = await self._run(self.service.attach, attachment_id, body)
        except HostagentError as exc:
            self.metrics.result("attach", exc.code)
            raise
        self.metrics.result("attach", "created" if created else "exists")
        return model_response(attachment, 201 if created else 200)

    async def delete_attachment(self, request: web.Request) -> web.Response:
        attachment_id = self._attachment_id(request)
        try:
            result = await self._run(self.service.detach, attachment_id)
        except HostagentError as exc:
            self.metrics.result("detach", exc.code)
            raise
        self.metrics.result("detach", "detached")
        return model_response(result)

    async def extend_attachment(self, request: web.Request) -> web.Response:
        attachment_id = self._attachment_id(request)
        body = await self._body(request, ExtendRequest)
        try:
            result = await self._run(self.extender.extend, attachment_id, body.new_size)
        except HostagentError as exc:
            self.metrics.result("extend", exc.code)
            raise
        resized = any(guest.resized for guest in result.guests)
        self.metrics.result("extend", "resized" if resized else "unchanged")
        return model_response(result)

    async def confirm_attachment(self, request: web.Request) -> web.Response:
        attachment_id = self._attachment_id(request)
        attachment = await self._run(self.service.migrations.confirm, attachment_id)
        return model_response(attachment)

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = await self._run(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_attachment(self, request: web.Request) -> web.Response:
        attachment_id = self._attachment_id(request)
        return model_response(await self._run(self.views.attachment, attachment_id))

    async def get_attachment_libvirt(self, request: web.Request) -> web.Response:
        attachment_id = self._attachment_id(request)
        return model_response(await self._run(self.views.libvirt, attachment_id))

    async def connector(self, request: web.Request) -> web.Response:
        properties = await self._run(
            functools.partial(
                _connector_properties,
                target=request.query.get("target"),
                host=self.connector_host,
                my_ip=self.connector_my_ip,
                multipath=self.connector_multipath,
                rbd_local_attach=self.connector_rbd_local_attach,
            )
        )
        return model_response(properties)

    async def doctor(self, request: web.Request) -> web.Response:
        return model_response(await self._run(self.views.doctor))

    async def list_attachments(self, request: web.Request) -> web.Response:
        attachments = await self._run(self.views.attachments)
        return model_response(AttachmentList(attachments=attachments))

    async def list_connections(self, request: web.Request) -> web.Response:
        return model_response(await self._run(self.views.connections))

    async def health(self, request: web.Request) -> web.Response:
        connected = self.libvirt_connected()
        return model_response(
            Health(
                status="ok" if connected else "degraded",
                libvirt="connected" if connected else "disconnected",
                version=__version__,
            )
        )

    async def reconcile(self, request: web.Request) -> web.Response:
        return model_response(await self._run(self.reconciler.run))

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)


ROUTES: tuple[Route, ...] = (
    Route(
        "PUT",
        "/v1/attachments/{attachment_id}",
        ApiHandlers.put_attachment,
        "Attach a volume to a guest (idempotent per attachment_id)",
        request=AttachRequest,
        responses={201: Attachment, 200: Attachment},
        errors=(
            InvalidRequest,
            DomainNotFound,
            AttachmentConflict,
            AttachmentIdReused,
            DomainExists,
            VolumeAlreadyAttached,
            VolumeNotMultiattach,
            TargetDevInUse,
            ConnectFailed,
            LibvirtError,
            LibvirtUnavailable,
        ),
    ),
    Route(
        "DELETE",
        "/v1/attachments/{attachment_id}",
        ApiHandlers.delete_attachment,
        "Detach; repeating a completed DELETE replays its body",
        responses={200: DetachResult},
        errors=(
            InvalidRequest,
            AttachmentNotFound,
            DomainMigrating,
            LibvirtError,
            DisconnectFailed,
            LibvirtUnavailable,
            DetachTimeout,
        ),
    ),
    Route(
        "POST",
        "/v1/attachments/{attachment_id}/confirm",
        ApiHandlers.confirm_attachment,
        "An incoming attachment is attached once its domain runs here with the disk",
        responses={200: Attachment},
        errors=(InvalidRequest, AttachmentNotFound, MigrationNotFinished, LibvirtUnavailable),
    ),
    Route(
        "GET",
        "/v1/attachments/{attachment_id}",
        ApiHandlers.get_attachment,
        "One attachment not yet detached",
        responses={200: Attachment},
        errors=(InvalidRequest, AttachmentNotFound),
    ),
    Route(
        "POST",
        "/v1/attachments/{attachment_id}/extend",
        ApiHandlers.extend_attachment,
        "Make the host and every running guest using the connection see the grown volume",
        request=ExtendRequest,
        responses={200: ExtendResult},
        errors=(
            InvalidRequest,
            AttachmentNotFound,
            DeviceNotExtended,
            ExtendFailed,
            LibvirtUnavailable,
        ),
    ),
    Route(
        "GET",
        "/v1/attachments/{attachment_id}/libvirt",
        ApiHandlers.get_attachment_libvirt,
        "The attachment's disk as libvirt has it now, and the virsh commands that show it",
        responses={200: LibvirtView},
        errors=(InvalidRequest, AttachmentNotFound, LibvirtUnavailable),
    ),
    Route(
        "GET",
        "/v1/attachments",
        ApiHandlers.list_attachments,
        "Attachments not yet detached, in any state",
        responses={200: AttachmentList},
    ),
    Route(
        "GET",
        "/v1/connections",
        ApiHandlers.list_connections,
        "Host connections and the attachments that use them",
        responses={200: ConnectionList},
    ),
    Route(
        "GET",
        "/v1/health",
        ApiHandlers.health,
        "Daemon and libvirt health",
        responses={200: Health},
    ),
    Route(
        "GET",
        "/v1/connector",
        ApiHandlers.connector,
        "This host's os-brick connector properties, ip chosen by a route lookup",
        responses={200: ConnectorProperties},
        errors=(InvalidRequest,),
        query={"target": "storage address (IP literal) to choose the source ip for"},
    ),
    Route(
        "GET",
        "/v1/doctor",
        ApiHandlers.doctor,
        "Disagreements between the records, libvirt and the host, with suggested commands",
        responses={200: DoctorReport},
        errors=(LibvirtUnavailable,),
    ),
    Route(
        "POST",
        "/v1/reconcile",
        ApiHandlers.reconcile,
        "Reconcile records against libvirt and host devices now",
        responses={200: ReconcileReport},
        errors=(LibvirtUnavailable,),
    ),
)


def make_app(handlers: ApiHandlers, policy: PeerPolicy) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[error_middleware, peer_auth_middleware(policy), body_limit_middleware],
    )
    for route in ROUTES:
        app.router.add_route(route.method, route.path, functools.partial(route.handler, handlers))
    app.router.add_get("/v1/openapi.json", handlers.get_openapi)
    app.router.add_get("/metrics", handlers.metrics_text)
    return app
