"""``rbd``: a Ceph RBD image, two ways (``[rbd] attach_mode``).

- ``librbd`` (default, as nova does): QEMU opens the image itself; there is
  no host device. What is per host is the libvirt secret holding the cephx
  key: when ``connection_info`` carries the key, the agent defines a private
  secret for the image on connect and undefines it on the last detach; when
  it names a ``secret_uuid`` the operator defined, that one is used.
- ``krbd``: os-brick's RBDConnector maps the image (``rbd map``) into a
  ``/dev/rbdN`` block device, refcounted like an iSCSI LUN, unmapped on the
  last detach.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from os_brick.initiator.connectors.rbd import RBDConnector as BrickRBDConnector

from hostagent.connectors.base import (
    BlockDiskSource,
    ConnectorError,
    ConnectorSettings,
    DiskSource,
    HostDevice,
    InvalidTarget,
    NetworkDiskSource,
    NetworkHost,
    SecretKeeper,
    Target,
    named_block_device,
    os_brick_errors,
    secret_keeper_errors,
)

MODES = ("librbd", "krbd")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){1,2}$")
_USER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,253}$")
_KEYRING_KEY = re.compile(r"^\s*key\s*=\s*(\S+)\s*$", re.MULTILINE)
# What only means something with cephx: dropped from a target whose
# connection_info says auth_enabled: false, so nothing asks for a secret.
_AUTH_FIELDS = ("auth_username", "key", "keyring", "secret_uuid")
# Secrets the agent defines get a UUID derived from the image, so a retry or
# a restart finds the same one.
SECRET_NAMESPACE = uuid.UUID("3f6f6a8e-0a39-4b8e-9b0e-6c1f2f5b7d11")


def cephx_key(data: Mapping[str, Any]) -> str | None:
    """The cephx key carried by connection_info (``key``, or inside ``keyring``)."""
    key = data.get("key")
    if key is None and isinstance(data.get("keyring"), str):
        found = _KEYRING_KEY.search(data["keyring"])
        key = found.group(1) if found else None
    if key is None:
        return None
    try:
        if not isinstance(key, str) or len(base64.b64decode(key, validate=True)) < 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise InvalidTarget("the cephx key in connection_info is not a base64 key") from None
    return key


def _monitors(data: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    hosts, ports = data.get("hosts"), data.get("ports")
    if not isinstance(hosts, list) or not hosts or not isinstance(ports, list):
        raise InvalidTarget("rbd connection_info.data needs hosts and ports lists")
    if len(hosts) != len(ports):
        raise InvalidTarget("rbd hosts and ports differ in length")
    for host in hosts:
        if not isinstance(host, str) or not _HOST.fullmatch(host):
            raise InvalidTarget(f"rbd monitor host {host!r} is not a host name or address")
    clean_ports = []
    for port in ports:
        if isinstance(port, bool) or not str(port).isdigit() or not 0 < int(port) < 65536:
            raise InvalidTarget(f"rbd monitor port {port!r} is not a port number")
        clean_ports.append(str(int(port)))
    return list(hosts), clean_ports


def agent_secret_uuid(target: Target) -> str:
    """The libvirt secret the agent defines for a target's cephx key: one per
    connection, named by its key, so a disconnect can find it without records."""
    return str(uuid.uuid5(SECRET_NAMESPACE, target.connection_key))


class RBDConnector:
    """Ceph RBD images, through QEMU's librbd or the kernel's rbd driver."""

    driver_volume_type: ClassVar[str] = "rbd"

    def __init__(
        self,
        *,
        attach_mode: str = "librbd",
        secrets: SecretKeeper | None = None,
        brick: Any | None = None,
    ) -> None:
        if attach_mode not in MODES:
            raise ValueError(f"rbd attach_mode must be one of {MODES}, not {attach_mode!r}")
        self.attach_mode = attach_mode
        self._secrets = secrets
        self._brick: Any = brick
        if attach_mode == "krbd":
            self._krbd()

    @classmethod
    def configured(cls, settings: ConnectorSettings, secrets: SecretKeeper | None) -> Self:
        return cls(attach_mode=settings.rbd_attach_mode, secrets=secrets)

    def _krbd(self) -> Any:
        """os-brick's RBDConnector for rbd map/unmap, made on first use: a
        librbd daemon needs it too, to unmap a connection recorded as krbd."""
        if self._brick is None:
            self._brick = BrickRBDConnector(root_helper=None, do_local_attach=True)
        return self._brick

    def parse_target(self, data: Mapping[str, Any]) -> Target:
        name = data.get("name")
        if (
            not isinstance(name, str)
            or not _NAME.fullmatch(name)
            or any(part in (".", "..") for part in name.split("/"))
        ):
            raise InvalidTarget("rbd connection_info.data.name must be 'pool/image'")
        hosts, ports = _monitors(data)
        cluster = data.get("cluster_name") or "ceph"
        if not isinstance(cluster, str) or not _USER.fullmatch(cluster):
            raise InvalidTarget("rbd cluster_name must be a plain name")
        auth_enabled = bool(data.get("auth_enabled", True))
        key, secret_uuid = self._cephx(data) if auth_enabled else (None, None)
        disk_format = data.get("format", "raw")
        if not isinstance(disk_format, str):
            raise InvalidTarget("connection_info.data.format must be a string")
        properties = {**data, "hosts": hosts, "ports": ports, "cluster_name": cluster}
        if not auth_enabled:
            # Ignored, so not kept: no secret is defined, asked for or rendered.
            for field in _AUTH_FIELDS:
                properties.pop(field, None)
        if secret_uuid is not None:
            properties["secret_uuid"] = secret_uuid
        if self.attach_mode == "krbd":
            properties["do_local_attach"] = True
            if key is not None and not isinstance(data.get("keyring"), str):
                # os-brick's rbd map reads the key only from keyring text
                properties["keyring"] = (
                    f"[client.{properties.get('auth_username')}]\n\tkey = {key}\n"
                )
        return Target(self.driver_volume_type, f"rbd:{cluster}/{name}", properties, disk_format)

    def _cephx(self, data: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """The cephx key and secret_uuid of a target with auth enabled, validated."""
        key = cephx_key(data)
        secret_uuid = data.get("secret_uuid")
        if data.get("auth_username") or key or secret_uuid:
            user = data.get("auth_username")
            if not isinstance(user, str) or not _USER.fullmatch(user):
                raise InvalidTarget("rbd auth_username must be a cephx user name")
            if secret_uuid is not None:
                try:
                    secret_uuid = str(uuid.UUID(str(secret_uuid)))
                except ValueError:
                    raise InvalidTarget("rbd secret_uuid is not a UUID") from None
            if key is None and secret_uuid is None and self.attach_mode == "librbd":
                raise InvalidTarget(
                    "rbd with cephx needs the key (key or keyring) or the secret_uuid of a "
                    "libvirt secret holding it"
                )
        return key, secret_uuid

    def guard(self, target: Target) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def connect(self, target: Target) -> HostDevice:
        if self.attach_mode == "krbd":
            return self._map(target)
        props = target.properties
        key = cephx_key(props)
        if key is not None:
            secret_uuid = agent_secret_uuid(target)
            with secret_keeper_errors():
                self._keeper().define_secret(
                    secret_uuid, f"hostagent {target.connection_key}", base64.b64decode(key)
                )
            return HostDevice(
                None, {"mode": "librbd", "secret_uuid": secret_uuid, "agent_secret": True}
            )
        named: str | None = props.get("secret_uuid")
        if named is not None:
            with secret_keeper_errors():
                known = self._keeper().has_secret(named)
            if not known:
                raise ConnectorError(
                    f"libvirt has no secret {named} for {target.connection_key}; define it "
                    "(virsh secret-define) or send the key"
                )
        return HostDevice(None, {"mode": "librbd", "secret_uuid": named, "agent_secret": False})

    def disconnect(self, target: Target, device: HostDevice) -> None:
        """Undo the connect: unmap (krbd) or drop the agent's secret (librbd).

        The mode recorded by the connect decides; a connect that never got
        recorded (a crash in the middle) is undone as this daemon's mode would
        have made it, secret included: undefining one that was never defined
        is fine."""
        info = device.device_info
        if info.get("mode", self.attach_mode) == "krbd":
            self._unmap(target, device)
        elif info.get("agent_secret"):
            with secret_keeper_errors():
                self._keeper().undefine_secret(str(info["secret_uuid"]))
        elif "mode" not in info and cephx_key(target.properties) is not None:
            with secret_keeper_errors():
                self._keeper().undefine_secret(agent_secret_uuid(target))

    def extend(self, target: Target, device: HostDevice, new_size: int | None) -> int:
        """krbd: os-brick's extend_volume reads the mapped device's new size.
        librbd: nothing on the host, QEMU's own librbd sees the image; the
        caller's ``new_size`` is the size (required). The recorded mode decides."""
        if device.device_info.get("mode", self.attach_mode) == "krbd":
            with os_brick_errors(f"rbd refresh of {target.connection_key}", target.properties):
                size = self._krbd().extend_volume(dict(target.properties))
            if not isinstance(size, int) or isinstance(size, bool):
                raise ConnectorError(f"rbd refresh of {target.connection_key} gave no size")
            return size
        if new_size is None:
            raise InvalidTarget(
                "new_size is required to extend an rbd volume QEMU opens itself (librbd)"
            )
        return new_size

    @staticmethod
    def canonical(target: Target) -> Target:
        return target

    @staticmethod
    def disk_source(target: Target, device: HostDevice) -> DiskSource:
        """The mapped device (krbd), else the image on its monitors, with the
        secret holding the cephx key (librbd)."""
        if device.path is not None:
            return BlockDiskSource(device.path)
        props = target.properties
        hosts = tuple(
            NetworkHost(name=str(host).strip("[]"), port=str(port))
            for host, port in zip(props["hosts"], props["ports"], strict=True)
        )
        # No user, no auth. With auth_enabled false, parse_target has dropped the
        # user, keys and secret_uuid; a joined connection's secret is not used.
        secret_uuid = device.device_info.get("secret_uuid") if props.get("auth_username") else None
        return NetworkDiskSource(
            protocol="rbd",
            name=str(props["name"]),
            hosts=hosts,
            auth_username=str(props["auth_username"]) if secret_uuid else None,
            secret_type="ceph" if secret_uuid else None,
            secret_uuid=str(secret_uuid) if secret_uuid else None,
        )

    @staticmethod
    def offline_disk_source(target: Target) -> DiskSource:
        """The image as librbd opens it, with the secret the agent would define
        for a key or the one connection_info names (or a device_path nova recorded)."""
        named_device = named_block_device(target)
        if named_device is not None:
            return named_device
        secret = target.properties.get("secret_uuid")
        if cephx_key(target.properties) is not None:
            secret = agent_secret_uuid(target)
        return RBDConnector.disk_source(target, HostDevice(None, {"secret_uuid": secret}))

    def _keeper(self) -> SecretKeeper:
        if self._secrets is None:
            raise ConnectorError("rbd in librbd mode needs libvirt to keep its secrets")
        return self._secrets

    def _map(self, target: Target) -> HostDevice:
        with os_brick_errors(f"rbd map of {target.connection_key}", target.properties):
            info = self._krbd().connect_volume(dict(target.properties))
        path = info.get("path") if isinstance(info, dict) else None
        if not isinstance(path, str):
            raise ConnectorError(f"rbd map of {target.connection_key} gave no block device")
        return HostDevice(path=path, device_info={"mode": "krbd", **info})

    def _unmap(self, target: Target, device: HostDevice) -> None:
        info = dict(device.device_info)
        conf = info.get("conf")
        with os_brick_errors(f"rbd unmap of {target.connection_key}", target.properties):
            brick = self._krbd()
            if isinstance(conf, str) and not os.path.exists(conf):
                # os-brick's temporary ceph.conf from the map is gone (a restart with
                # a fresh /tmp): write another one from the stored properties to unmap.
                info["conf"] = brick.create_non_openstack_config(dict(target.properties))
            brick.disconnect_volume(dict(target.properties), info)
