"""Real parts for integration tests: loop devices, KVM guests, a hostagentd process.

Nothing here is a fake: guests are real QEMU/KVM domains of the host's
libvirtd (q35, a virtio-scsi controller, no OS: the firmware halts), devices are
real loop devices, and the daemon is the installed ``hostagentd`` program
driven over its unix socket.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
from lxml import etree

from hostagent.attachments.reconcile import Reconciler
from hostagent.attachments.service import AttachmentService, ServiceSettings
from hostagent.client import ApiError, HostagentClient
from hostagent.connectors import Connector, ConnectorRegistry
from hostagent.guests.domains import Guests as HostGuests
from hostagent.host.holders import processes_holding
from hostagent.locks import HostLocks
from hostagent.state.store import Store

LIBVIRT_URI = "qemu:///system"
GUEST_PREFIX = "hatest-"
# QEMU's minimal firmware (Debian: qemu-system-data). It finds no kernel and
# halts the vCPU at once: about 0.03 s of CPU per guest start, where SeaBIOS
# (the default) spends 4-5 s of a full core probing for a boot device first.
QBOOT = Path("/usr/share/qemu/qboot.rom")


class ReconnectingConnection:
    """A libvirt connection for the tests that reopens itself after libvirtd restarts."""

    def __init__(self, uri: str = LIBVIRT_URI) -> None:
        self.uri = uri
        self._conn = libvirt.open(uri)

    def __getattr__(self, name: str) -> Any:
        try:
            self._conn.getLibVersion()  # a round trip: isAlive() misses a closed socket
        except libvirt.libvirtError:
            self._conn = libvirt.open(self.uri)
        return getattr(self._conn, name)


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


class LoopDevices:
    """Sparse files attached to loop devices, detached again at cleanup."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.devices: list[str] = []
        self.backing: dict[str, Path] = {}
        self._count = itertools.count()

    def make(self, size_mb: int = 16) -> str:
        backing = self.directory / f"loop-{next(self._count)}.img"
        with backing.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        device = run("losetup", "--find", "--show", str(backing))
        self.devices.append(device)
        self.backing[device] = backing
        return device

    def recreate(self, device: str) -> None:
        """Detach ``device`` and attach the same file at the same number: what a
        reboot followed by the storage coming back looks like for a loop device."""
        run("losetup", "-d", device)
        run("losetup", device, str(self.backing[device]))

    def cleanup(self) -> None:
        for device in self.devices:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        self.devices.clear()


def guest_xml(name: str, *, virtio_scsi: bool = True, root_ports: int = 4) -> str:
    """A firmware-only q35 guest: hotplug of SCSI disks needs no guest help.
    qboot if QEMU has it (idle from the start), else SeaBIOS."""
    ports = "\n".join(
        "    <controller type='pci' model='pcie-root-port'/>" for _ in range(root_ports)
    )
    scsi = "    <controller type='scsi' index='0' model='virtio-scsi'/>" if virtio_scsi else ""
    loader = f"<loader readonly='yes' type='rom'>{QBOOT}</loader>" if QBOOT.exists() else ""
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{loader}</os>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='pci' model='pcie-root'/>
{ports}
{scsi}
  </devices>
</domain>"""


@dataclass
class Guest:
    """A test domain, with helpers that read what libvirt and QEMU say now."""

    conn: Any
    name: str
    uuid: str
    persistent: bool

    @property
    def dom(self) -> Any:
        return self.conn.lookupByUUIDString(self.uuid)

    def xml(self, *, inactive: bool = False) -> etree._Element:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return etree.fromstring(self.dom.XMLDesc(flags).encode())

    def disks(self, *, inactive: bool = False) -> list[etree._Element]:
        return list(self.xml(inactive=inactive).findall("./devices/disk"))

    def disk(self, alias: str, *, inactive: bool = False) -> etree._Element | None:
        for disk in self.disks(inactive=inactive):
            found = disk.find("./alias")
            if found is not None and found.get("name") == alias:
                return disk
        return None

    def aliases(self, *, inactive: bool = False) -> set[str]:
        return {
            a.get("name", "")
            for d in self.disks(inactive=inactive)
            if (a := d.find("./alias")) is not None
        }

    def qmp(self, command: str, **arguments: Any) -> Any:
        payload: dict[str, Any] = {"execute": command}
        if arguments:
            payload["arguments"] = arguments
        reply = libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps(payload), 0)
        return json.loads(reply)["return"]

    def open_block_devices(self) -> dict[str, str]:
        """qdev id -> host file, from QEMU's own ``query-block``."""
        found = {}
        for entry in self.qmp("query-block"):
            inserted = entry.get("inserted")
            if inserted:
                found[entry.get("qdev") or entry.get("device")] = inserted["file"]
        return found

    def attach_raw(self, xml: str) -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if self.persistent:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self.dom.attachDeviceFlags(xml, flags)


def hand_made_disk(device: str, *, target_dev: str, unit: int, alias: str | None = None) -> str:
    """A shareable SCSI disk on ``device``, as an operator would hand to virsh."""
    alias_xml = f"<alias name='{alias}'/>" if alias else ""
    return (
        "<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"<source dev='{device}'/><target dev='{target_dev}' bus='scsi'/><shareable/>"
        f"{alias_xml}<address type='drive' controller='0' bus='0' target='0' unit='{unit}'/>"
        "</disk>"
    )


class Guests:
    """Creates guests and removes every one of them at cleanup."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.created: list[Guest] = []
        self._count = itertools.count()

    def make(
        self, *, persistent: bool = False, virtio_scsi: bool = True, root_ports: int = 4
    ) -> Guest:
        name = f"{GUEST_PREFIX}{os.getpid()}-{next(self._count)}"
        xml = guest_xml(name, virtio_scsi=virtio_scsi, root_ports=root_ports)
        if persistent:
            dom = self.conn.defineXML(xml)
            dom.create()
        else:
            dom = self.conn.createXML(xml, 0)
        guest = Guest(self.conn, name, dom.UUIDString(), persistent)
        self.created.append(guest)
        return guest

    def define(self, *disks: str) -> Guest:
        """A persistent domain, defined with these disks (XML) and never started."""
        name = f"{GUEST_PREFIX}{os.getpid()}-{next(self._count)}"
        xml = guest_xml(name).replace("  </devices>", "".join(disks) + "  </devices>")
        dom = self.conn.defineXML(xml)
        guest = Guest(self.conn, name, dom.UUIDString(), True)
        self.created.append(guest)
        return guest

    def cleanup(self) -> None:
        # A destroy takes 1-2 s here, most of it waiting for QEMU to exit: the
        # guests of a test go in parallel (libvirt connections are thread-safe).
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda guest: remove_domain(self.conn, guest.uuid), self.created))
        self.created.clear()


def remove_domain(conn: Any, domain_uuid: str) -> None:
    try:
        dom = conn.lookupByUUIDString(domain_uuid)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isPersistent():
            dom.undefine()


def _owner_alive(name: str) -> bool:
    """Whether the test process that made guest ``name`` (``<prefix><pid>-<n>``) runs."""
    pid = name[len(GUEST_PREFIX) :].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_guests(conn: Any) -> None:
    """Domains left by an earlier, killed test run (not those of a run still going)."""
    for dom in conn.listAllDomains(0):
        name = dom.name()
        if name.startswith(GUEST_PREFIX) and not _owner_alive(name):
            remove_domain(conn, dom.UUIDString())


@dataclass
class Daemon:
    """A real hostagentd process on a private state dir and socket."""

    state_dir: Path
    socket_path: Path
    log_path: Path
    options: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def _args(self) -> list[str]:
        """The command line; ``section.key`` options go to a config file instead."""
        config_file = self.state_dir.parent / f"{self.state_dir.name}.conf"
        sections: dict[str, list[str]] = {}
        args = [sys.executable, "-m", "hostagent.daemon", "--config-file", str(config_file)]
        args += ["--state-dir", str(self.state_dir), "--socket-path", str(self.socket_path)]
        args += ["--libvirt-uri", LIBVIRT_URI]
        for key, value in self.options.items():
            if "." in key:
                section, name = key.split(".", 1)
                sections.setdefault(section, []).append(f"{name} = {value}")
            else:
                args += [f"--{key}"] + ([value] if value else [])  # "" is a bare flag
        config_file.write_text(
            "".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())
        )
        return args

    def run_once(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """Run hostagentd for a one-shot command (e.g. --rebuild-state)."""
        return subprocess.run(
            [*self._args(), *extra],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={**os.environ, **self.env},
        )

    def start(self, timeout: float = 30.0) -> None:
        args = self._args()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"hostagentd exited {code}:\n{self.log()}")
            with contextlib.suppress(ApiError):
                self.client.health()
                return
            time.sleep(0.05)
        raise RuntimeError(f"hostagentd did not answer within {timeout}s:\n{self.log()}")

    @property
    def client(self) -> HostagentClient:
        return HostagentClient(str(self.socket_path))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def wait_killed(self, timeout: float = 30.0) -> int:
        """Wait for a process that is expected to die (a failpoint); returns its status."""
        assert self.process is not None
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def local_request(
    device: str, domain: Guest | str, *, volume_id: str, **extra: Any
) -> dict[str, Any]:
    """An attach body for a ``local`` device."""
    body: dict[str, Any] = {
        "volume_id": volume_id,
        "domain": domain if isinstance(domain, str) else domain.name,
        "connection_info": {"driver_volume_type": "local", "data": {"device_path": device}},
    }
    body.update(extra)
    return body


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_consistent(
    client: HostagentClient, guests: list[Guest], *, orphans_allowed: bool = False
) -> None:
    """The store (through the API), every guest's XML and the connections agree.

    - no attachment is left half-made; a detaching one still has its disk;
    - every attached record's disk is in its guest (live if running, config
      if persistent), and no guest holds a ``ua-`` disk nobody recorded;
    - every connection is up, has users, and counts exactly its attachments;
      with ``orphans_allowed`` one without users may stay if a process holds
      its device open (a QEMU disk libvirt lost when libvirtd was killed in
      the middle of a hot-plug: the guard keeps such a device);
    - every device a guest's ``ua-`` disk uses has its connection.
    """
    attachments = {a.attachment_id: a for a in client.list()}
    connections = {c.connection_key: c for c in client.connections().connections}
    recorded_aliases = {(a.domain_uuid, a.alias) for a in attachments.values()}
    for guest in guests:
        try:
            active = bool(guest.dom.isActive())
        except libvirt.libvirtError:
            continue  # gone
        views = ([guest.disks()] if active else []) + (
            [guest.disks(inactive=True)] if guest.persistent else []
        )
        for disks in views:
            for disk in disks:
                alias = disk.find("./alias")
                name = alias.get("name", "") if alias is not None else ""
                if not name.startswith("ua-"):
                    continue
                assert (guest.uuid, name) in recorded_aliases, f"{guest.name} holds {name}"
                source = disk.find("./source")
                device = source.get("dev") if source is not None else None
                assert f"local:{device}" in connections, f"{device} of {name} was disconnected"
    for attachment in attachments.values():
        assert attachment.state in ("attached", "detaching"), attachment
        owner = next((g for g in guests if g.uuid == attachment.domain_uuid), None)
        if owner is None:
            continue
        user_alias = attachment.alias
        present = owner.disk(user_alias) is not None or (
            owner.persistent and owner.disk(user_alias, inactive=True) is not None
        )
        if attachment.state == "attached":
            assert present, f"{user_alias} recorded attached but not on {owner.name}"
    for key, connection in connections.items():
        users = [a for a in attachments.values() if a.connection_key == key]
        if not users and orphans_allowed and connection.device_path is not None:
            assert processes_holding(connection.device_path), f"{key} kept, yet nobody holds it"
        else:
            assert users, f"connection {key} has no users"
        assert connection.state == "connected", connection
        assert connection.host_refcount == len(users)


def service_with(
    connector: Connector,
    state_dir: Path,
    guests: HostGuests,
    *,
    boot_id: str = "",
    detach_timeout: int = 5,
) -> AttachmentService:
    """The attachment service in-process, its state in ``state_dir``, with
    ``connector`` (a recording fake where a test must fail os-brick) for ``local``."""
    return AttachmentService(
        store=Store(state_dir / "state.sqlite3"),
        guests=guests,
        registry=ConnectorRegistry({"local": connector}),
        locks=HostLocks(state_dir / "locks"),
        settings=ServiceSettings(
            detach_timeout=detach_timeout, detach_retry_interval=1, boot_id=boot_id
        ),
    )


def reconciler_for(service: AttachmentService) -> Reconciler:
    """A reconciler on the same parts as ``service``, as the daemon wires them."""
    return Reconciler(
        store=service.store,
        guests=service.guests,
        locks=service.locks,
        connections=service.connections,
        disks=service.disks,
        boot_id=service.settings.boot_id,
        tombstone_ttl=86400,
    )
