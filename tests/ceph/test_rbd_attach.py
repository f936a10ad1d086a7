"""RBD through QEMU's librbd, on a real Ceph cluster and real KVM guests."""

from __future__ import annotations

import base64
import subprocess
import uuid
from typing import Any

import libvirt
import pytest

from hostagent.client import ApiError
from hostagent.connectors.rbd import SECRET_NAMESPACE
from tests.ceph.cluster import CephCluster
from tests.conftest import DaemonFactory
from tests.integration.support import Guest, Guests, unique

POOL = "volumes"
USER = "cinder"


def rbd_info(cluster: CephCluster, image: str, **auth: Any) -> dict[str, Any]:
    """Cinder's connection_info for ``image`` (pool/name)."""
    return {
        "driver_volume_type": "rbd",
        "data": {
            "name": image,
            "hosts": [cluster.mon_host],
            "ports": [str(cluster.mon_port)],
            "cluster_name": "ceph",
            "auth_enabled": True,
            "auth_username": USER,
            "secret_type": "ceph",
            "volume_id": image.split("/")[1],
            **auth,
        },
    }


def secrets() -> set[str]:
    listed = subprocess.run(["virsh", "secret-list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines()[2:] if line.strip()}


def rbd_disk(guest: Guest, alias: str) -> dict[str, str | None]:
    disk = guest.disk(alias)
    assert disk is not None, f"{guest.name} has no {alias}"
    source, auth, secret = disk.find("./source"), disk.find("./auth"), disk.find("./auth/secret")
    host = disk.find("./source/host")
    assert source is not None and auth is not None and secret is not None and host is not None
    return {
        "type": disk.get("type"),
        "protocol": source.get("protocol"),
        "name": source.get("name"),
        "host": host.get("name"),
        "user": auth.get("username"),
        "secret": secret.get("uuid"),
        "shareable": "yes" if disk.find("./shareable") is not None else None,
        "cache": disk.find("./driver").get("cache"),  # type: ignore[union-attr]
    }


@pytest.fixture
def image(ceph_cluster: CephCluster) -> str:
    ceph_cluster.create_pool(POOL)
    return ceph_cluster.create_image(POOL, unique("vol"), size_mb=32)


def test_an_image_shared_by_two_guests_with_a_secret_the_agent_keeps(
    daemon_factory: DaemonFactory, guests: Guests, ceph_cluster: CephCluster, image: str
) -> None:
    key = ceph_cluster.client_key(USER, POOL)
    daemon = daemon_factory()
    client = daemon.client
    first, second = guests.make(), guests.make(persistent=True)
    ids = [unique("att"), unique("att")]
    body = {
        "volume_id": image.split("/")[1],
        "multiattach": True,
        "connection_info": rbd_info(ceph_cluster, image, key=key),
    }
    agent_secret = str(uuid.uuid5(SECRET_NAMESPACE, f"rbd:ceph/{image}"))

    a1, _ = client.attach(ids[0], {**body, "domain": first.name})
    assert (a1.connection_key, a1.device_path, a1.host_refcount) == (f"rbd:ceph/{image}", None, 1)
    assert agent_secret in secrets()
    refused = subprocess.run(
        ["virsh", "secret-get-value", agent_secret], capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0, "the secret is private: libvirt will not give it back"
    a2, _ = client.attach(ids[1], {**body, "domain": second.name})
    assert a2.host_refcount == 2

    for guest, attachment_id in ((first, ids[0]), (second, ids[1])):
        assert rbd_disk(guest, f"ua-{attachment_id}") == {
            "type": "network",
            "protocol": "rbd",
            "name": image,
            "host": ceph_cluster.mon_host,
            "user": USER,
            "secret": agent_secret,
            "shareable": "yes",
            "cache": "none",
        }
    config = second.disk(f"ua-{ids[1]}", inactive=True)
    assert config is not None, "the persistent guest has it in its config too"
    assert len(ceph_cluster.image_watchers(POOL, image.split("/")[1])) == 2, (
        "both QEMUs have the image open through librbd"
    )

    one = client.detach(ids[0])
    assert (one.host_refcount, one.terminate_connection) == (1, False)
    assert agent_secret in secrets(), "the other guest still needs the key"
    assert len(ceph_cluster.image_watchers(POOL, image.split("/")[1])) == 1
    last = client.detach(ids[1])
    assert (last.host_refcount, last.host_disconnected, last.terminate_connection) == (
        0,
        True,
        True,
    )
    assert agent_secret not in secrets(), "undefined on the last detach"
    assert ceph_cluster.image_watchers(POOL, image.split("/")[1]) == []
    assert key not in daemon.log()
    assert key not in a1.model_dump_json() + a2.model_dump_json()


def test_qemu_does_not_refuse_a_second_writer_on_rbd_so_the_agent_must(
    daemon_factory: DaemonFactory, guests: Guests, ceph_cluster: CephCluster, image: str
) -> None:
    key = ceph_cluster.client_key(USER, POOL)
    raw_secret = str(uuid.uuid4())
    define_operator_secret(raw_secret, key)
    try:
        one, two = guests.make(), guests.make()
        xml = (
            "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            f"<source protocol='rbd' name='{image}'><host name='{ceph_cluster.mon_host}' "
            f"port='{ceph_cluster.mon_port}'/></source>"
            f"<auth username='{USER}'><secret type='ceph' uuid='{raw_secret}'/></auth>"
            "<target dev='sdb' bus='scsi'/>"
            "<address type='drive' controller='0' bus='0' target='0' unit='1'/></disk>"
        )
        one.attach_raw(xml)
        two.attach_raw(xml)  # no <shareable/>, yet QEMU takes it: rbd has no image locking
        assert len(ceph_cluster.image_watchers(POOL, image.split("/")[1])) == 2
        one.dom.destroy()
        two.dom.destroy()

        client = daemon_factory().client
        three, four = guests.make(), guests.make()
        body = {"volume_id": "v", "connection_info": rbd_info(ceph_cluster, image, key=key)}
        client.attach(unique("att"), {**body, "domain": three.name})
        with pytest.raises(ApiError) as refused:
            client.attach(unique("att"), {**body, "domain": four.name})
        assert (refused.value.status, refused.value.code) == (409, "volume_not_multiattach")
        assert four.disks() == []
    finally:
        undefine_secret(raw_secret)


def define_operator_secret(secret_uuid: str, key: str) -> None:
    conn = libvirt.open("qemu:///system")
    try:
        xml = (
            f"<secret ephemeral='no' private='yes'><uuid>{secret_uuid}</uuid>"
            f"<usage type='ceph'><name>operator {secret_uuid}</name></usage></secret>"
        )
        conn.secretDefineXML(xml, 0).setValue(base64.b64decode(key), 0)
    finally:
        conn.close()


def undefine_secret(secret_uuid: str) -> None:
    subprocess.run(["virsh", "secret-undefine", secret_uuid], capture_output=True, check=False)


def test_an_operators_secret_and_a_hand_added_disk_are_left_alone(
    daemon_factory: DaemonFactory, guests: Guests, ceph_cluster: CephCluster, image: str
) -> None:
    key = ceph_cluster.client_key(USER, POOL)
    operator_secret = str(uuid.uuid4())
    define_operator_secret(operator_secret, key)
    try:
        client = daemon_factory().client
        ours, theirs = guests.make(), guests.make()
        attachment_id = unique("att")
        client.attach(
            attachment_id,
            {
                "volume_id": "v",
                "domain": ours.name,
                "multiattach": True,
                "connection_info": rbd_info(ceph_cluster, image, secret_uuid=operator_secret),
            },
        )
        assert rbd_disk(ours, f"ua-{attachment_id}")["secret"] == operator_secret
        theirs.attach_raw(
            "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            f"<source protocol='rbd' name='{image}'><host name='{ceph_cluster.mon_host}' "
            f"port='{ceph_cluster.mon_port}'/></source>"
            f"<auth username='{USER}'><secret type='ceph' uuid='{operator_secret}'/></auth>"
            "<target dev='sdb' bus='scsi'/><shareable/>"
            "<address type='drive' controller='0' bus='0' target='0' unit='1'/></disk>"
        )
        result = client.detach(attachment_id)
        assert (result.host_disconnected, result.terminate_connection) == (False, False), (
            "a domain still uses the image: the export must stay"
        )
        report = client.doctor()
        assert [f.kind for f in report.findings] == ["unused_connection", "foreign_disk"]
        theirs.dom.destroy()
        assert [a.action for a in client.reconcile().actions] == ["disconnected"]
        assert operator_secret in secrets(), "the operator's secret is theirs to remove"
    finally:
        undefine_secret(operator_secret)
