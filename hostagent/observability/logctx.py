"""Log lines that say which request, attachment and volume they belong to.

The current request lives in a ContextVar (asyncio tasks and the worker
threads that API handlers hand work to each see their own); a logging filter
puts it on every record, where oslo.log's formatter and journald handler
pick up ``request_id``, ``attachment_id`` and ``volume_id``. A second filter
masks anything that looks like a password, key or secret in every line.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

from oslo_context import context as oslo_context
from oslo_utils import strutils

CONTEXT_FORMAT = (
    "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s "
    "[%(request_id)s att=%(attachment_id)s vol=%(volume_id)s] %(message)s"
)
DEFAULT_FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s [-] %(message)s"
JOURNAL_FIELDS = ("attachment_id", "volume_id")


class RequestContext(oslo_context.RequestContext):
    """oslo.context's request context plus the attachment and volume at hand."""

    def __init__(
        self, *, attachment_id: str | None = None, volume_id: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(overwrite=False, **kwargs)
        self.attachment_id = attachment_id
        self.volume_id = volume_id

    def update_store(self) -> None:
        """Never use oslo.context's thread-local: in asyncio and a thread pool it
        would tag later lines with a request that is over; a ContextVar holds it."""

    def get_logging_values(self) -> dict[str, Any]:
        values: dict[str, Any] = super().get_logging_values()
        values["attachment_id"] = self.attachment_id or "-"
        values["volume_id"] = self.volume_id or "-"
        return values


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "hostagent_request", default=None
)


@contextlib.contextmanager
def request_context(
    *, attachment_id: str | None = None, volume_id: str | None = None
) -> Iterator[RequestContext]:
    """Make a new request context current for the block (and what it hands to threads)."""
    ctx = RequestContext(attachment_id=attachment_id, volume_id=volume_id)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def current() -> RequestContext | None:
    return _CURRENT.get()


def note(*, attachment_id: str | None = None, volume_id: str | None = None) -> None:
    """Fill in what a request learns as it goes (the volume of a DELETE, say)."""
    ctx = _CURRENT.get()
    if ctx is None:
        return
    if attachment_id is not None:
        ctx.attachment_id = attachment_id
    if volume_id is not None:
        ctx.volume_id = volume_id


class ContextFilter(logging.Filter):
    """Puts the current request context on each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _CURRENT.get()
        if ctx is not None and "context" not in record.__dict__:
            record.context = ctx
        return True


# cephx keys, which oslo's mask_password leaves alone: a "key" or "keyring"
# field (dict repr, JSON, ini, yaml) followed by a base64 value, the "key = ..."
# line inside keyring text, and rbd's "--key <key>" (os-brick's command line,
# as text or as an argv repr), in any case, the value maybe a bytes repr
# (b'...'). Not "connection_key" and the like, not a plain "key <word>" (a
# multipath WWID), and not a value that is no 20+ character base64 run.
_CEPHX_KEY = re.compile(
    r"(?:(?<![A-Za-z_])|(?<=\\[tn]))"  # not inside a name; a repr's "\tkey" is fine
    r"("
    r"key(?:ring)?['\"]?\s*[:=]\s*(?:b?['\"])?"  # key: v  key=v  'key': 'v'  key=b'v'
    r"|key['\"],\s*b?['\"]"  # an argv repr: '--key', 'v'
    r"|(?<=--)key\s+"  # --key v
    r")"
    r"[A-Za-z0-9+/]{20,}={0,2}",
    re.IGNORECASE,
)


def mask_secrets(text: str) -> str:
    """``text`` with passwords, tokens, secrets and cephx keys replaced by ***."""
    return _CEPHX_KEY.sub(r"\1***", strutils.mask_password(text))


_TRACEBACKS = logging.Formatter()
# Set on a record by SecretFilter: its message (msg % args) is masked.
_MASKED = "hostagent_masked"


class SecretFilter(logging.Filter):
    """Masks passwords, keys and secrets in every line, whoever logs it, and in
    the traceback of ``LOG.exception`` (a chained exception's text is in it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        record.__dict__[_MASKED] = True
        if record.exc_info and not record.exc_text:
            # What logging.Formatter.format would put there; it (and a handler
            # such as oslo.log's journald one) reuses exc_text when it is set.
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True


class MaskingFormatter(logging.Formatter):
    """A handler's formatter whose output is masked as well.

    oslo.log's ContextFormatter ignores a masked ``exc_text``: it formats the
    traceback again from ``exc_info`` and appends the exception's first line
    (``error_summary``, from ``exc_info`` or the exception being handled), which
    no filter can reach. So the line it writes is masked once more here,
    unless it holds nothing but the message the filter masked (most lines:
    each was masked twice).
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        if _nothing_but_the_masked_message(record):
            return line  # the filter masked all of it that is not plain fields
        line = mask_secrets(line)
        if record.exc_text:  # the inner formatter's own, for handlers that reuse it
            record.exc_text = mask_secrets(record.exc_text)
        return line

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return mask_secrets(self.inner.formatException(ei))


def _nothing_but_the_masked_message(record: logging.LogRecord) -> bool:
    """The line carries no text but the message SecretFilter masked and the
    record's plain fields: no traceback, no stack, and no exception summary,
    which oslo.log appends from the exception being handled (in this thread)
    to a WARNING or worse. Then masking the whole line again finds nothing."""
    return bool(
        record.__dict__.get(_MASKED)
        and not (record.exc_info or record.exc_text or record.stack_info)
        and (record.levelno < logging.WARNING or sys.exc_info()[0] is None)
    )


def install_filters(logger: logging.Logger | None = None) -> None:
    """Add both filters to every handler of ``logger`` (the root logger by default)
    and mask what its formatter writes."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(ContextFilter())
        handler.addFilter(SecretFilter())
        if not isinstance(handler.formatter, MaskingFormatter):
            handler.setFormatter(MaskingFormatter(handler.formatter or logging.Formatter()))
        fields = getattr(handler, "custom_fields", None)
        if isinstance(fields, tuple) and JOURNAL_FIELDS[0] not in fields:
            handler.custom_fields = fields + JOURNAL_FIELDS  # type: ignore[attr-defined]
