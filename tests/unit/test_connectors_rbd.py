"""connectors/rbd.py: librbd secrets and krbd maps, at recording fakes of their boundaries.

The real librbd path runs against a real Ceph cluster in
tests/integration/test_rbd.py; krbd needs the kernel's rbd module, which
this machine lacks, so its os-brick boundary is a recording fake here.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from typing import Any

import pytest

from hostagent.attachments.render import disk_source, render_disk_xml
from hostagent.connectors import (
    BlockDiskSource,
    ConnectorError,
    HostDevice,
    InvalidTarget,
    NetworkDiskSource,
    NetworkHost,
    SecretKeeperFailed,
)
from hostagent.connectors import rbd as rbd_module
from hostagent.connectors.base import scrub
from hostagent.connectors.rbd import SECRET_NAMESPACE, RBDConnector, cephx_key
from hostagent.errors import LibvirtError, LibvirtUnavailable
from hostagent.libvirt_xml.policy import NetworkSource

KEY = base64.b64encode(b"k" * 28).decode()


class RecordingSecretKeeper:
    """Stands in for libvirt's secret API and records what the connector asks;
    with ``failure``, every call raises it (libvirt refusing, or gone)."""

    def __init__(self, existing: set[str] | None = None, failure: Exception | None = None) -> None:
        self.secrets: dict[str, tuple[str, bytes]] = {}
        self.existing = existing or set()
        self.calls: list[tuple[str, str]] = []
        self.failure = failure

    def _fail(self) -> None:
        if self.failure is not None:
            raise self.failure

    def define_secret(self, uuid: str, usage_name: str, value: bytes) -> None:
        self.calls.append(("define", uuid))
        self._fail()
        self.secrets[uuid] = (usage_name, value)

    def undefine_secret(self, uuid: str) -> None:
        self.calls.append(("undefine", uuid))
        self._fail()
        self.secrets.pop(uuid, None)

    def has_secret(self, uuid: str) -> bool:
        self._fail()
        return uuid in self.secrets or uuid in self.existing


class AskedSecretKeeper(RecordingSecretKeeper):
    """Records has_secret too: a connect that needs no secret never asks."""

    def has_secret(self, uuid: str) -> bool:
        self.calls.append(("has", uuid))
        return super().has_secret(uuid)


class RecordingBrickRBD:
    """Stands in for os-brick's RBDConnector with do_local_attach (rbd map)."""

    def __init__(
        self, conf: str = "/tmp/brickrbd_recorded", failure: Exception | None = None
    ) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.conf = conf
        self.failure = failure

    def connect_volume(self, properties: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("map", properties))
        if self.failure is not None:
            raise self.failure
        return {"path": "/dev/rbd0", "type": "block", "conf": self.conf}

    def create_non_openstack_config(self, properties: dict[str, Any]) -> str:
        self.calls.append(("write conf", properties))
        return "/tmp/brickrbd_new"

    def disconnect_volume(self, properties: dict[str, Any], device_info: dict[str, Any]) -> None:
        self.calls.append(("unmap", {**properties, **device_info}))
        if self.failure is not None:
            raise self.failure

    def extend_volume(self, properties: dict[str, Any]) -> int:
        """os-brick reads the mapped device's size from sysfs."""
        self.calls.append(("extend", properties))
        if self.failure is not None:
            raise self.failure
        return 5 << 30


def cinder_data(**extra: Any) -> dict[str, Any]:
    """Cinder's RBD connection_info data."""
    return {
        "name": "volumes/volume-1",
        "hosts": ["192.0.2.1", "192.0.2.2", "[2001:db8::3]"],
        "ports": ["6789", "6789", 6789],
        "cluster_name": "ceph",
        "auth_enabled": True,
        "auth_username": "cinder",
        "secret_type": "ceph",
        **extra,
    }


def test_a_key_becomes_an_agent_secret_defined_once_per_image_and_removed_at_the_end() -> None:
    keeper = RecordingSecretKeeper()
    connector = RBDConnector(secrets=keeper)
    target = connector.parse_target(cinder_data(keyring=f"[client.cinder]\n\tkey = {KEY}\n"))
    assert target.connection_key == "rbd:ceph/volumes/volume-1"
    assert KEY not in repr(target)
    device = connector.connect(target)
    expected_uuid = str(uuid.uuid5(SECRET_NAMESPACE, target.connection_key))
    assert device == HostDevice(
        None, {"mode": "librbd", "secret_uuid": expected_uuid, "agent_secret": True}
    )
    assert keeper.secrets[expected_uuid] == (
        "hostagent rbd:ceph/volumes/volume-1",
        base64.b64decode(KEY),
    )
    assert connector.connect(target) == device, "the same secret again: idempotent"

    source = disk_source(target, device)
    assert isinstance(source, NetworkSource)
    assert source.name == "volumes/volume-1"
    assert [(h.name, h.port) for h in source.hosts] == [
        ("192.0.2.1", "6789"),
        ("192.0.2.2", "6789"),
        ("2001:db8::3", "6789"),
    ]
    assert (source.auth_username, source.secret_type, source.secret_uuid) == (
        "cinder",
        "ceph",
        expected_uuid,
    )

    connector.disconnect(target, device)
    assert keeper.secrets == {}


def test_an_operators_secret_is_used_and_never_removed() -> None:
    operator_uuid = "7d7c3e7e-0000-4000-8000-00000000abcd"
    keeper = RecordingSecretKeeper(existing={operator_uuid})
    connector = RBDConnector(secrets=keeper)
    target = connector.parse_target(cinder_data(secret_uuid=operator_uuid))
    device = connector.connect(target)
    assert device.device_info == {
        "mode": "librbd",
        "secret_uuid": operator_uuid,
        "agent_secret": False,
    }
    connector.disconnect(target, device)
    assert keeper.calls == [], "the operator's secret is theirs"

    missing = connector.parse_target(cinder_data(secret_uuid=str(uuid.uuid4())))
    with pytest.raises(ConnectorError, match="libvirt has no secret"):
        connector.connect(missing)


@pytest.mark.parametrize(
    "failure",
    [
        LibvirtError("define secret x: operation failed"),
        LibvirtUnavailable("libvirt qemu:///system is not connected; retry later"),
    ],
    ids=["refused", "away"],
)
def test_libvirt_failing_the_secrets_is_a_connector_error_carrying_libvirts_own(
    failure: Exception,
) -> None:
    connector = RBDConnector(secrets=RecordingSecretKeeper(failure=failure))
    with_key = connector.parse_target(cinder_data(key=KEY))
    named = connector.parse_target(cinder_data(secret_uuid="7d7c3e7e-0000-4000-8000-00000000abcd"))
    agents = HostDevice(None, {"mode": "librbd", "secret_uuid": "u", "agent_secret": True})
    never_recorded = HostDevice(None, {})
    for step in (
        lambda: connector.connect(with_key),  # define
        lambda: connector.connect(named),  # look up
        lambda: connector.disconnect(with_key, agents),  # undefine
        lambda: connector.disconnect(with_key, never_recorded),
    ):
        with pytest.raises(SecretKeeperFailed) as failed:
            step()
        assert isinstance(failed.value, ConnectorError), "inside the connector contract"
        assert failed.value.cause is failure and str(failed.value) == str(failure)

    nowhere = RBDConnector()  # no keeper at all: the connector's own error, not libvirt's
    with pytest.raises(ConnectorError, match="needs libvirt") as missing:
        nowhere.connect(with_key)
    assert not isinstance(missing.value, SecretKeeperFailed)


def test_disk_sources_online_and_offline() -> None:
    operator_uuid = "7d7c3e7e-0000-4000-8000-00000000abcd"
    connector = RBDConnector(secrets=RecordingSecretKeeper(existing={operator_uuid}))
    with_key = connector.parse_target(cinder_data(key=KEY))
    agents = str(uuid.uuid5(SECRET_NAMESPACE, with_key.connection_key))
    monitors = (
        NetworkHost("192.0.2.1", "6789"),
        NetworkHost("192.0.2.2", "6789"),
        NetworkHost("2001:db8::3", "6789"),
    )
    image = NetworkDiskSource("rbd", "volumes/volume-1", monitors, "cinder", "ceph", agents)
    assert connector.disk_source(with_key, connector.connect(with_key)) == image
    assert connector.offline_disk_source(with_key) == image, "offline: the secret it would make"
    named = connector.parse_target(cinder_data(secret_uuid=operator_uuid))
    assert connector.offline_disk_source(named) == replace(image, secret_uuid=operator_uuid)
    mapped = HostDevice("/dev/rbd0", {"mode": "krbd", "path": "/dev/rbd0"})
    assert connector.disk_source(with_key, mapped) == BlockDiskSource("/dev/rbd0")


def test_a_connect_that_was_never_recorded_is_undone_in_the_daemons_mode() -> None:
    # A crash between the connection's intent and its "connected" record leaves
    # no device info: reconcile's disconnect must still work, and remove a
    # secret the interrupted connect may have defined.
    never_recorded = HostDevice(None, {})
    keeper = RecordingSecretKeeper()
    librbd = RBDConnector(secrets=keeper)
    with_key = librbd.parse_target(cinder_data(key=KEY))
    librbd.connect(with_key)
    librbd.disconnect(with_key, never_recorded)
    assert keeper.secrets == {}, "the agent's secret is gone"
    operators = RecordingSecretKeeper(existing={"7d7c3e7e-0000-4000-8000-00000000abcd"})
    named = RBDConnector(secrets=operators)
    named.disconnect(
        named.parse_target(cinder_data(secret_uuid="7d7c3e7e-0000-4000-8000-00000000abcd")),
        never_recorded,
    )
    assert operators.calls == [], "an operator's secret is never touched"

    brick = RecordingBrickRBD()
    krbd = RBDConnector(attach_mode="krbd", brick=brick)
    krbd.disconnect(krbd.parse_target(cinder_data(key=KEY)), never_recorded)
    assert [call for call, _ in brick.calls] == ["unmap"]


def test_the_recorded_mode_wins_over_the_configured_one() -> None:
    keeper = RecordingSecretKeeper()
    made_by_librbd = RBDConnector(secrets=keeper)
    target = made_by_librbd.parse_target(cinder_data(key=KEY))
    device = made_by_librbd.connect(target)
    brick = RecordingBrickRBD()
    # The operator switched to krbd since: the librbd connection is still undone as such.
    RBDConnector(attach_mode="krbd", brick=brick, secrets=keeper).disconnect(target, device)
    assert brick.calls == [] and keeper.secrets == {}


def made_on_demand(monkeypatch: pytest.MonkeyPatch, brick: Any) -> list[dict[str, Any]]:
    """Stand ``brick`` in for os-brick's RBDConnector class; returns how it was made."""
    made: list[dict[str, Any]] = []

    def construct(**kwargs: Any) -> Any:
        made.append(kwargs)
        if isinstance(brick, Exception):
            raise brick
        return brick

    monkeypatch.setattr(rbd_module, "BrickRBDConnector", construct)
    return made


def krbd_connection(brick: RecordingBrickRBD) -> tuple[Any, HostDevice]:
    """A target and device as a krbd daemon recorded them, its /tmp conf since gone."""
    target = RBDConnector(attach_mode="krbd", brick=brick).parse_target(cinder_data(key=KEY))
    device = HostDevice(
        "/dev/rbd0",
        {"mode": "krbd", "path": "/dev/rbd0", "conf": "/tmp/brickrbd_gone_with_the_restart"},
    )
    return target, device


def test_a_librbd_daemon_unmaps_a_connection_recorded_as_krbd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The operator switched from krbd to librbd: the mapped image is still unmapped.
    brick = RecordingBrickRBD()
    target, device = krbd_connection(RecordingBrickRBD())
    made = made_on_demand(monkeypatch, brick)
    keeper = RecordingSecretKeeper()
    librbd = RBDConnector(secrets=keeper)
    assert made == [], "os-brick's connector is made only when an unmap needs it"
    librbd.disconnect(target, device)
    assert made == [{"root_helper": None, "do_local_attach": True}], "as krbd mode makes it"
    assert [call for call, _ in brick.calls] == ["write conf", "unmap"]
    assert brick.calls[-1][1]["path"] == "/dev/rbd0"
    assert brick.calls[-1][1]["conf"] == "/tmp/brickrbd_new"
    assert keeper.calls == [], "no secret is touched for a krbd connection"


@pytest.mark.parametrize(
    "brick",
    [
        RecordingBrickRBD(failure=OSError(f"rbd unmap --key {KEY} /dev/rbd0: exit 16")),
        OSError(f"cannot make os-brick's connector for --key {KEY}: exit 16"),
    ],
    ids=["unmap fails", "os-brick cannot be made"],
)
def test_a_librbd_daemons_krbd_unmap_fails_as_a_connector_error_without_the_key(
    monkeypatch: pytest.MonkeyPatch, brick: Any
) -> None:
    target, device = krbd_connection(RecordingBrickRBD())
    made_on_demand(monkeypatch, brick)
    with pytest.raises(ConnectorError) as failure:
        RBDConnector(secrets=RecordingSecretKeeper()).disconnect(target, device)
    message = str(failure.value)
    assert message.startswith("rbd unmap of rbd:ceph/volumes/volume-1 failed: OSError")
    assert KEY not in message and "***" in message and "exit 16" in message


@pytest.mark.parametrize("attach_mode", ["librbd", "krbd"])
def test_auth_disabled_drops_the_user_keys_and_secret_uuid(attach_mode: str) -> None:
    connector = RBDConnector(
        attach_mode=attach_mode, secrets=RecordingSecretKeeper(), brick=RecordingBrickRBD()
    )
    for ignored in (
        {"secret_uuid": 12},
        {"secret_uuid": "7d7c3e7e-0000-4000-8000-00000000abcd"},
        {"key": KEY, "keyring": f"[client.cinder]\n\tkey = {KEY}\n", "secret_uuid": 12},
    ):
        target = connector.parse_target(cinder_data(auth_enabled=False, **ignored))
        props = target.properties
        for field in ("auth_username", "key", "keyring", "secret_uuid"):
            assert field not in props, f"{field} is kept with auth disabled ({attach_mode})"
        assert props["name"] == "volumes/volume-1" and props["auth_enabled"] is False


def test_auth_disabled_with_a_user_and_secret_uuid_renders_and_connects_without_auth() -> None:
    operator_uuid = "7d7c3e7e-0000-4000-8000-00000000abcd"
    data = cinder_data(auth_enabled=False, secret_uuid=operator_uuid)
    keeper = AskedSecretKeeper()
    connector = RBDConnector(secrets=keeper)
    target = connector.parse_target(data)
    device = connector.connect(target)
    assert keeper.calls == [], "no secret is asked for, defined or removed"
    assert device.device_info.get("secret_uuid") is None
    source = disk_source(target, device)
    assert isinstance(source, NetworkSource)
    assert (source.auth_username, source.secret_type, source.secret_uuid) == (None, None, None)
    xml = render_disk_xml(
        {"driver_volume_type": "rbd", "data": data},
        attachment_id="att-1",
        serial="volume-1",
        multiattach=False,
        mode="rw",
        bus="virtio",
        target_dev=None,
    )
    assert "<auth" not in xml and operator_uuid not in xml and "cinder" not in xml
    connector.disconnect(target, device)
    assert keeper.calls == []


def test_a_secret_uuid_with_auth_disabled_renders_a_disk_without_auth() -> None:
    operator_uuid = "7d7c3e7e-0000-4000-8000-00000000abcd"
    connector = RBDConnector(secrets=RecordingSecretKeeper(existing={operator_uuid}))
    target = connector.parse_target(
        cinder_data(auth_enabled=False, auth_username=None, secret_uuid=operator_uuid)
    )
    source = disk_source(target, connector.connect(target))
    assert isinstance(source, NetworkSource)
    assert (source.auth_username, source.secret_uuid) == (None, None)


def test_no_auth_needs_no_secret() -> None:
    connector = RBDConnector(secrets=RecordingSecretKeeper())
    target = connector.parse_target(cinder_data(auth_enabled=False, auth_username=None))
    device = connector.connect(target)
    source = disk_source(target, device)
    assert isinstance(source, NetworkSource) and source.secret_uuid is None
    assert source.auth_username is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (cinder_data(name="volume-1"), "pool/image"),
        (cinder_data(name="pool/../x"), "pool/image"),
        (cinder_data(hosts=[]), "hosts and ports"),
        (cinder_data(ports=["6789"]), "differ in length"),
        (cinder_data(ports=["0", "1", "2"]), "not a port number"),
        (cinder_data(hosts=["a b", "x", "y"]), "not a host"),
        (cinder_data(), "needs the key"),
        (cinder_data(key="not-base64!"), "not a base64 key"),
        (cinder_data(secret_uuid="nope"), "not a UUID"),
        (cinder_data(auth_username="bad user", key=KEY), "cephx user"),
        (cinder_data(cluster_name="a/b", key=KEY), "cluster_name"),
    ],
)
def test_bad_rbd_targets_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTarget, match=message):
        RBDConnector(secrets=RecordingSecretKeeper()).parse_target(data)


def test_krbd_maps_once_and_unmaps_with_what_map_returned(tmp_path: Any) -> None:
    conf = tmp_path / "brickrbd_x"
    conf.write_text("[global]\n")
    brick = RecordingBrickRBD(str(conf))
    connector = RBDConnector(attach_mode="krbd", brick=brick)
    keyring = f"[client.cinder]\n\tkey = {KEY}\n"
    target = connector.parse_target(cinder_data(keyring=keyring))
    device = connector.connect(target)
    assert device.path == "/dev/rbd0"
    connector.disconnect(target, device)
    (_, mapped), (_, unmapped) = brick.calls
    assert mapped["do_local_attach"] is True and mapped["keyring"] == keyring
    assert unmapped["path"] == "/dev/rbd0"
    assert unmapped["conf"] == str(conf), "the map's own conf while it exists"


def test_krbd_takes_a_bare_key_as_keyring_text() -> None:
    brick = RecordingBrickRBD()
    connector = RBDConnector(attach_mode="krbd", brick=brick)
    connector.connect(connector.parse_target(cinder_data(key=KEY)))
    ((_, mapped),) = brick.calls
    assert mapped["keyring"] == f"[client.cinder]\n\tkey = {KEY}\n"


def test_krbd_unmaps_after_a_restart_that_emptied_tmp() -> None:
    brick = RecordingBrickRBD("/tmp/brickrbd_gone_with_the_restart")
    connector = RBDConnector(attach_mode="krbd", brick=brick)
    target = connector.parse_target(cinder_data(key=KEY))
    device = connector.connect(target)
    connector.disconnect(target, device)
    assert [c for c, _ in brick.calls] == ["map", "write conf", "unmap"]
    assert brick.calls[-1][1]["conf"] == "/tmp/brickrbd_new"


def test_krbd_failures_name_the_step_and_never_the_key() -> None:
    # os-brick's errors echo the rbd command line, key included.
    brick = RecordingBrickRBD(failure=OSError(f"rbd map --key {KEY} volumes/volume-1: exit 22"))
    connector = RBDConnector(attach_mode="krbd", brick=brick)
    target = connector.parse_target(cinder_data(key=KEY))
    with pytest.raises(ConnectorError) as mapping:
        connector.connect(target)
    device = HostDevice("/dev/rbd0", {"mode": "krbd", "path": "/dev/rbd0"})
    with pytest.raises(ConnectorError) as unmapping:
        connector.disconnect(target, device)
    assert str(mapping.value).startswith("rbd map of rbd:")
    assert str(unmapping.value).startswith("rbd unmap of rbd:")
    for error in (mapping.value, unmapping.value):
        assert KEY not in str(error) and "***" in str(error)
        assert "OSError" in str(error) and "exit 22" in str(error)
        assert isinstance(error.__cause__, OSError), "the os-brick error stays the cause"


def test_error_scrubbing_blanks_secrets_not_what_names_them() -> None:
    props = cinder_data(key=KEY, secret_uuid="7d7c3e7e-0000-4000-8000-00000000abcd")
    message = scrub(f"rbd --id cinder --key {KEY} on ceph pool, secret type ceph", props)
    assert KEY not in message
    assert "ceph pool" in message and "type ceph" in message


def test_key_parsing() -> None:
    assert cephx_key({"key": KEY}) == KEY
    assert cephx_key({"keyring": f"[client.x]\n key = {KEY}\n caps mon = x\n"}) == KEY
    assert cephx_key({}) is None
    with pytest.raises(InvalidTarget):
        cephx_key({"key": base64.b64encode(b"short").decode()})
    with pytest.raises(ValueError, match="attach_mode"):
        RBDConnector(attach_mode="nbd")


def test_krbd_extend_is_os_bricks_refresh_of_the_mapped_device() -> None:
    brick = RecordingBrickRBD()
    krbd = RBDConnector(attach_mode="krbd", brick=brick)
    target = krbd.parse_target(cinder_data(key=KEY))
    device = krbd.connect(target)
    assert krbd.extend(target, device, None) == 5 << 30
    assert [call for call, _ in brick.calls] == ["map", "extend"]


def test_librbd_extend_touches_nothing_and_needs_the_new_size() -> None:
    keeper = RecordingSecretKeeper()
    connector = RBDConnector(secrets=keeper)
    target = connector.parse_target(cinder_data(key=KEY))
    device = connector.connect(target)
    calls = list(keeper.calls)
    assert connector.extend(target, device, 3 << 30) == 3 << 30
    with pytest.raises(InvalidTarget, match="new_size is required"):
        connector.extend(target, device, None)
    assert keeper.calls == calls
