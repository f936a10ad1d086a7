"""Which libvirt errors mean "the connection to libvirtd is gone".

Getting this wrong is costly both ways: a QEMU that dies under a call must
not make the daemon drop every libvirt connection and answer 503 (seen in CI:
a repeated unplug reached a guest being destroyed), and a dead connection
must not be taken for a refusal. libvirt's errors are built here as libvirt
builds them (code, domain, message); the connection is a recording fake.
"""

from __future__ import annotations

import libvirt
import pytest

from hostagent.errors import DomainNotFound, LibvirtError, LibvirtUnavailable
from hostagent.guests.session import LibvirtSession, connection_lost


def libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return exc


class RecordingConnection:
    """Answers isAlive() as told and records that it was asked."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.asked = 0

    def isAlive(self) -> int:  # noqa: N802 (libvirt's name)
        self.asked += 1
        return int(self.alive)


QEMU_MONITOR_RESET = libvirt_error(
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_FROM_QEMU,
    "Unable to read from monitor: Connection reset by peer",
)
RPC_RESET = libvirt_error(
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_FROM_RPC,
    "Cannot recv data: Connection reset by peer",
)


def test_a_system_error_is_the_connections_only_from_the_rpc_layer() -> None:
    assert not connection_lost(QEMU_MONITOR_RESET)
    assert connection_lost(RPC_RESET)
    for code in (libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN):
        assert connection_lost(libvirt_error(code, libvirt.VIR_FROM_NONE, "x"))
    refused = libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU, "busy")
    assert not connection_lost(refused)


@pytest.mark.parametrize(
    ("exc", "alive", "expected"),
    [
        (QEMU_MONITOR_RESET, True, LibvirtError),
        (RPC_RESET, True, LibvirtUnavailable),
        (QEMU_MONITOR_RESET, False, LibvirtUnavailable),
        (
            libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "no domain"),
            True,
            DomainNotFound,
        ),
    ],
    ids=["qemu-died", "rpc-reset", "connection-dead", "no-domain"],
)
def test_errors_are_translated_by_what_failed(
    exc: libvirt.libvirtError, alive: bool, expected: type[Exception]
) -> None:
    session = LibvirtSession("qemu:///system", register_events=lambda conn: None)
    translated = session._translate(RecordingConnection(alive), exc, "detach ua-x")
    assert type(translated) is expected
    assert "detach ua-x" in str(translated)
