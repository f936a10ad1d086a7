#!/usr/bin/env python3
"""The least a daemon in front of libvirt can cost: a bare HTTP-to-libvirt proxy.

Serves ``PUT`` / ``DELETE /v1/attachments/{id}`` on a unix socket with the
same HTTP stack as hostagentd (aiohttp, a thread pool, libvirt-python on a
few kept connections with cached domain handles, DEVICE_REMOVED from
libvirt's event loop), and does nothing else: no validation, no state, no
locks, no checks before a disconnect, no logs. The PUT body carries the
domain UUID, the disk XML and its alias; the DELETE unplugs that alias and
waits for DEVICE_REMOVED.

``bench/attach_detach.py --proxy-floor`` measures it beside hostagentd and
raw libvirt in the same run: whatever the proxy costs over raw libvirt, any
daemon with an HTTP hop pays too, so it bounds what the targets can ask of
hostagentd on the machine at hand. Never a way to attach volumes for real.

    .venv/bin/python bench/proxy_floor.py /tmp/proxy.sock
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import libvirt
from aiohttp import web

CONNECTIONS = 4
REMOVAL_TIMEOUT = 20.0


class LibvirtProxy:
    """attachDeviceFlags / detachDeviceAlias + DEVICE_REMOVED, nothing more."""

    def __init__(self, uri: str) -> None:
        libvirt.registerErrorHandler(lambda opaque, error: None, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._events, name="libvirt-events", daemon=True).start()
        self._conns = [libvirt.open(uri) for _ in range(CONNECTIONS)]
        self._turn = itertools.count()
        self._handles: dict[tuple[int, str], Any] = {}
        self._removed: dict[tuple[str, str], threading.Event] = {}
        self._attached: dict[str, tuple[str, str]] = {}
        self._mutex = threading.Lock()
        self._conns[0].domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._device_removed, None
        )

    @staticmethod
    def _events() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _device_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        with self._mutex:
            event = self._removed.get((dom.UUIDString(), alias))
        if event is not None:
            event.set()

    def _domain(self, domain_uuid: str) -> Any:
        conn = self._conns[next(self._turn) % len(self._conns)]
        key = (id(conn), domain_uuid)
        dom = self._handles.get(key)
        if dom is None:
            dom = self._handles[key] = conn.lookupByUUIDString(domain_uuid)
        return dom

    def attach(self, attachment_id: str, domain_uuid: str, xml: str, alias: str) -> None:
        self._domain(domain_uuid).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        with self._mutex:
            self._attached[attachment_id] = (domain_uuid, alias)

    def detach(self, attachment_id: str) -> None:
        with self._mutex:
            domain_uuid, alias = self._attached.pop(attachment_id)
            removed = self._removed[(domain_uuid, alias)] = threading.Event()
        try:
            self._domain(domain_uuid).detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if not removed.wait(REMOVAL_TIMEOUT):
                raise RuntimeError(f"{alias} was not removed within {REMOVAL_TIMEOUT:g}s")
        finally:
            with self._mutex:
                self._removed.pop((domain_uuid, alias), None)


def make_app(proxy: LibvirtProxy) -> web.Application:
    pool = ThreadPoolExecutor(16, thread_name_prefix="proxy")

    async def put(request: web.Request) -> web.Response:
        attachment_id = request.match_info["attachment_id"]
        body = json.loads(await request.read())
        await asyncio.get_running_loop().run_in_executor(
            pool, proxy.attach, attachment_id, body["domain_uuid"], body["xml"], body["alias"]
        )
        return web.json_response({"attachment_id": attachment_id, "state": "attached"}, status=201)

    async def delete(request: web.Request) -> web.Response:
        attachment_id = request.match_info["attachment_id"]
        await asyncio.get_running_loop().run_in_executor(pool, proxy.detach, attachment_id)
        return web.json_response({"attachment_id": attachment_id, "state": "detached"})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_put("/v1/attachments/{attachment_id}", put)
    app.router.add_delete("/v1/attachments/{attachment_id}", delete)
    app.router.add_get("/v1/health", health)
    return app


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    socket_path = Path(sys.argv[1])
    socket_path.unlink(missing_ok=True)
    app = make_app(LibvirtProxy("qemu:///system"))
    web.run_app(app, path=str(socket_path), access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
