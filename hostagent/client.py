"""Python client of the v1 API over the unix socket, for virt drivers and hostagentctl.

Importing it loads only the standard library: the typed methods load the pydantic
models when first called, so ``request`` alone (hostagentctl's read commands) stays
fast to start.
"""

# ruff: noqa: PLC0415  (the models are imported where first needed, on purpose)

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lxml import etree

    from hostagent.api.models import (
        Attachment,
        AttachRequest,
        ConnectionList,
        ConnectorProperties,
        DetachResult,
        DoctorReport,
        ExtendResult,
        Health,
        LibvirtView,
        ReconcileReport,
    )

DEFAULT_SOCKET = "/run/hostagent/hostagent.sock"


def default_socket() -> str:
    return os.environ.get("HOSTAGENT_SOCKET", DEFAULT_SOCKET)


class ApiError(Exception):
    """An error reply of the daemon (or no daemon at all: status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def attachment_path(attachment_id: str, suffix: str = "") -> str:
    """``/v1/attachments/{id}{suffix}`` with the id as one path segment: "a1?x" must
    reach the daemon (and be refused) as itself, not as "a1" with a query string."""
    return f"/v1/attachments/{urllib.parse.quote(attachment_id, safe='')}{suffix}"


def connector_path(target: str | None = None) -> str:
    """``/v1/connector``, asking for the ip that reaches ``target`` if given."""
    return f"/v1/connector?target={urllib.parse.quote(target)}" if target else "/v1/connector"


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None


def _api_error(status: int, raw: bytes, data: Any) -> ApiError:
    """The API's error body as an exception (or the raw text's start when it has none)."""
    error = data.get("error", {}) if isinstance(data, dict) else {}
    return ApiError(
        status,
        str(error.get("code", "http_error")),
        str(error.get("message", raw[:200].decode(errors="replace"))),
    )


class HostagentClient:
    """One request per connection: simple, and safe to share between threads."""

    def __init__(self, socket_path: str | None = None, timeout: float = 120.0) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; returns (status, decoded JSON) or raises ApiError."""
        status, raw = self._exchange(method, path, body)
        data = _json_or_none(raw)
        if status >= 400:
            raise _api_error(status, raw, data)
        return status, data

    def text(self, path: str) -> str:
        """GET a path that answers text (``/metrics``); raises ApiError as ``request`` does."""
        status, raw = self._exchange("GET", path, None)
        if status >= 400:
            raise _api_error(status, raw, _json_or_none(raw))
        return raw.decode()

    def _exchange(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError as exc:
            raise ApiError(
                0,
                "timeout",
                f"no answer from hostagentd within {self.timeout:g}s; the request may still "
                "be running there (repeating it is safe)",
            ) from exc
        except OSError as exc:
            raise ApiError(0, "unreachable", f"hostagentd at {self.socket_path}: {exc}") from exc
        finally:
            conn.close()
        return response.status, raw

    def attach(
        self, attachment_id: str, request: AttachRequest | dict[str, Any]
    ) -> tuple[Attachment, bool]:
        """Attach; returns the attachment and whether it was created now (201)."""
        from hostagent.api.models import Attachment, AttachRequest

        body = (
            request.model_dump(exclude_none=True)
            if isinstance(request, AttachRequest)
            else request
        )
        status, data = self.request("PUT", attachment_path(attachment_id), body)
        return Attachment.model_validate(data), status == 201

    def attach_incoming(
        self, attachment_id: str, request: AttachRequest | dict[str, Any], alias: str
    ) -> tuple[Attachment, bool]:
        """On a migration's destination, before it starts: connect for the disk
        ``alias`` (the source agent's) of the domain ``request`` names by UUID."""
        from hostagent.api.models import AttachRequest

        body = (
            request.model_dump(exclude_none=True)
            if isinstance(request, AttachRequest)
            else request
        )
        return self.attach(attachment_id, {**body, "incoming_migration": {"alias": alias}})

    def confirm(self, attachment_id: str) -> Attachment:
        """On a migration's destination, after it: the incoming attachment is attached
        (ApiError 409 migration_not_finished while the domain is not here with it)."""
        from hostagent.api.models import Attachment

        _, data = self.request("POST", attachment_path(attachment_id, "/confirm"))
        return Attachment.model_validate(data)

    def detach(self, attachment_id: str) -> DetachResult:
        from hostagent.api.models import DetachResult

        _, data = self.request("DELETE", attachment_path(attachment_id))
        return DetachResult.model_validate(data)

    def extend(self, attachment_id: str, new_size: int | None = None) -> ExtendResult:
        """Make the host and every running guest using the volume see its new size."""
        from hostagent.api.models import ExtendResult

        body = {} if new_size is None else {"new_size": new_size}
        _, data = self.request("POST", attachment_path(attachment_id, "/extend"), body)
        return ExtendResult.model_validate(data)

    def get(self, attachment_id: str) -> Attachment:
        from hostagent.api.models import Attachment

        _, data = self.request("GET", attachment_path(attachment_id))
        return Attachment.model_validate(data)

    def list(self) -> list[Attachment]:
        from hostagent.api.models import AttachmentList

        _, data = self.request("GET", "/v1/attachments")
        return AttachmentList.model_validate(data).attachments

    def connections(self) -> ConnectionList:
        from hostagent.api.models import ConnectionList

        _, data = self.request("GET", "/v1/connections")
        return ConnectionList.model_validate(data)

    def health(self) -> Health:
        from hostagent.api.models import Health

        _, data = self.request("GET", "/v1/health")
        return Health.model_validate(data)

    def reconcile(self) -> ReconcileReport:
        from hostagent.api.models import ReconcileReport

        _, data = self.request("POST", "/v1/reconcile")
        return ReconcileReport.model_validate(data)

    def libvirt_view(self, attachment_id: str) -> LibvirtView:
        from hostagent.api.models import LibvirtView

        _, data = self.request("GET", attachment_path(attachment_id, "/libvirt"))
        return LibvirtView.model_validate(data)

    def connector(self, target: str | None = None) -> ConnectorProperties:
        from hostagent.api.models import ConnectorProperties

        _, data = self.request("GET", connector_path(target))
        return ConnectorProperties.model_validate(data)

    def doctor(self) -> DoctorReport:
        from hostagent.api.models import DoctorReport

        _, data = self.request("GET", "/v1/doctor")
        return DoctorReport.model_validate(data)


def destination_xml(domain_xml: str, incoming: Iterable[Attachment]) -> str:
    """The domain XML to pass to libvirt's migration (``VIR_MIGRATE_PARAM_DEST_XML``):
    ``domain_xml`` (the source's, e.g. ``XMLDesc(VIR_DOMAIN_XML_MIGRATABLE)``) with
    the ``<source>`` of each agent disk replaced by the one the destination agent
    answered for it (matched by alias). Everything else, the alias, target and
    address included, stays as the source has it; ValueError if a disk is missing."""
    from lxml import etree  # here, not at import: hostagentctl's reads stay light

    root = etree.fromstring(domain_xml.encode())
    for attachment in incoming:
        if attachment.disk_xml is None:
            raise ValueError(f"attachment {attachment.attachment_id} has no disk_xml")
        wanted = etree.fromstring(attachment.disk_xml.encode())
        disk = _disk_by_alias(root, attachment.alias)
        source = wanted.find("./source")
        if disk is None or source is None:
            raise ValueError(f"no disk {attachment.alias} in the domain, or no source for it")
        disk.set("type", wanted.get("type") or disk.get("type") or "block")
        # what names the storage on this host: the source, a network disk's auth
        for tag in ("source", "auth"):
            for old in disk.findall(f"./{tag}"):
                disk.remove(old)
        disk.insert(0, source)
        auth = wanted.find("./auth")
        if auth is not None:
            disk.insert(1, auth)
    return str(etree.tostring(root, encoding="unicode"))


def _disk_by_alias(root: etree._Element, alias: str) -> etree._Element | None:
    for disk in root.iterfind("./devices/disk"):
        found = disk.find("./alias")
        if found is not None and found.get("name") == alias:
            return disk
    return None
