"""Errors the service raises, each with the HTTP status and code of API.md."""

from __future__ import annotations


class HostagentError(Exception):
    """Base of every error the API turns into ``{"error": {"code", "message"}}``."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(HostagentError):
    status, code = 400, "invalid_request"


class Forbidden(HostagentError):
    status, code = 403, "forbidden"


class DomainNotFound(HostagentError):
    status, code = 404, "domain_not_found"


class AttachmentNotFound(HostagentError):
    status, code = 404, "attachment_not_found"


class AttachmentConflict(HostagentError):
    status, code = 409, "attachment_conflict"


class AttachmentIdReused(HostagentError):
    status, code = 409, "attachment_id_reused"


class VolumeNotMultiattach(HostagentError):
    status, code = 409, "volume_not_multiattach"


class VolumeAlreadyAttached(HostagentError):
    status, code = 409, "volume_already_attached"


class TargetDevInUse(HostagentError):
    status, code = 409, "target_dev_in_use"


class DeviceNotExtended(HostagentError):
    """The host device is smaller than the extend's new_size: the storage was not
    extended yet; nothing was changed."""

    status, code = 409, "device_not_extended"


class ExtendFailed(HostagentError):
    """os-brick or libvirt refused an extend; the message names the guests resized before."""

    status, code = 502, "extend_failed"


class DomainExists(HostagentError):
    """An incoming attachment names a domain that runs here outside a migration."""

    status, code = 409, "domain_exists"


class MigrationNotFinished(HostagentError):
    status, code = 409, "migration_not_finished"


class DomainMigrating(HostagentError):
    """The domain is in a libvirt migration job; retry after it."""

    status, code = 409, "domain_migrating"


class ConnectFailed(HostagentError):
    status, code = 502, "connect_failed"


class DisconnectFailed(HostagentError):
    """os-brick could not release the host connection; the attachment stays detaching."""

    status, code = 502, "disconnect_failed"


class LibvirtError(HostagentError):
    status, code = 502, "libvirt_error"


class LibvirtUnavailable(HostagentError):
    status, code = 503, "libvirt_unavailable"


class DetachTimeout(HostagentError):
    status, code = 504, "detach_timeout"


# The HTTP layer answers these itself (aiohttp's exceptions and parser errors,
# the middlewares); they are classes so routes and the OpenAPI document name
# them like the service's errors.


class NotFound(HostagentError):
    status, code = 404, "not_found"


class MethodNotAllowed(HostagentError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(HostagentError):
    status, code = 408, "request_timeout"


class RequestTooLarge(HostagentError):
    status, code = 413, "request_too_large"


class TooManyConnections(HostagentError):
    status, code = 503, "too_many_connections"


class HttpVersionNotSupported(HostagentError):
    status, code = 505, "http_version_not_supported"
