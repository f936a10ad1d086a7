"""aiohttp's HTTP/1 connection handling, held to API.md: every error is the
JSON error body, only HTTP/1.0 and 1.1 are served, a request's headers must
arrive in time, and the number of open connections is bounded.

aiohttp answers a request it cannot parse with a text/plain 400 from
``RequestHandler.handle_error``; that method is overridden here. The rest uses
the handler's request queue (``_messages``, ``_waiter``, ``_ErrInfo``), the way
aiohttp itself queues a parser error, so every answer still goes through
aiohttp's writer. ``ApiRunner`` is an ``AppRunner`` whose server makes these
handlers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import _ErrInfo

from hostagent.api.middlewares import error_response
from hostagent.errors import (
    HostagentError,
    HttpVersionNotSupported,
    InvalidRequest,
    RequestTimeout,
    TooManyConnections,
)

LOG = logging.getLogger(__name__)

SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a request's line and headers may take, and how many connections
    may be open at once ([api] header_timeout, max_connections)."""

    header_timeout: float
    max_connections: int


def describe_parser_error(exc: BaseException | None) -> str:
    """What was wrong with the request, without echoing the client's bytes."""
    if isinstance(exc, LineTooLong):
        return f"a request line or header is longer than {exc.args[1]} bytes"
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc or "")
    # llhttp's message is a sentence, a blank line, then the offending bytes.
    first = " ".join(text.split("\n\n", 1)[0].split()).rstrip(":")
    return first[:200] or "bad request"


class ApiRequestHandler(web.RequestHandler):
    """One connection: aiohttp's protocol with the API's errors and limits."""

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        # Whether bytes of the next request arrived since the connection opened or
        # its previous response: decides between a 408 and closing an idle connection.
        self._request_started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._waiter is not None:  # start() waits for a request: these are its bytes
            self._request_started = True
        super().data_received(data)
        self._refuse_unsupported_versions()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        finished = await super().finish_response(request, resp, start_time)
        self._await_headers()
        return finished

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The API's error body for what aiohttp answers itself (the parser's 400,
        a handler's uncaught error) and for the errors queued here; the
        connection closes after it, as aiohttp's own answer does."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way; cannot send the error")
        if isinstance(exc, HostagentError):
            error = exc
        elif status == 400:
            error = InvalidRequest(f"malformed request: {describe_parser_error(exc)}")
        else:
            LOG.error("error handling a request (%d)", status, exc_info=exc)
            error = HostagentError("internal error; see the daemon log")
            error.status = status
            error.code = "internal_error" if status == 500 else "http_error"
        LOG.warning("refused a request: %d %s: %s", error.status, error.code, error.message)
        response = error_response(error.status, error.code, error.message)
        response.force_close()
        return response

    def refuse(self, error: HostagentError) -> None:
        """Answer the next request slot with ``error`` and close the connection."""
        self._messages.append((_ErrInfo(error.status, error, error.message), EMPTY_PAYLOAD))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _refuse_unsupported_versions(self) -> None:
        unsupported = [
            (index, message.version, payload)
            for index, (message, payload) in enumerate(self._messages)
            if isinstance(message, RawRequestMessage)
            and tuple(message.version) not in SUPPORTED_VERSIONS
        ]
        for index, (major, minor), payload in unsupported:
            error = HttpVersionNotSupported(f"HTTP/{major}.{minor} is not served; use HTTP/1.1")
            self._messages[index] = (_ErrInfo(error.status, error, error.message), payload)

    def _await_headers(self) -> None:
        """From now, the next request's line and headers have header_timeout to arrive."""
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._request_started = False
        self._header_timer = self._loop.call_later(
            self._limits.header_timeout, self._headers_overdue
        )

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self._waiter is None or self._waiter.done():
            return  # a request is being handled; its finish_response starts the next wait
        if self._request_started:
            self.refuse(
                RequestTimeout(
                    f"the request headers did not arrive within {self._limits.header_timeout:g}s"
                )
            )
        else:  # an idle keep-alive connection: close it, as aiohttp's keep-alive timeout does
            self.force_close()


class HttpServer(web.Server):
    """aiohttp's Server, making ApiRequestHandler connections and refusing those
    over ``max_connections``."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self) -> ApiRequestHandler:
        return ApiRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self.connections) > self.limits.max_connections:
            assert isinstance(handler, ApiRequestHandler)
            handler.refuse(
                TooManyConnections(
                    f"{self.limits.max_connections} connections are open already; retry later"
                )
            )


class ApiRunner(web.AppRunner):
    """An AppRunner serving the application through HttpServer."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the app started and frozen, aiohttp's options
        return HttpServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            limits=self.limits,
            **made._kwargs,
        )
