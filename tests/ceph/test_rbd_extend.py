"""Online extend of an RBD image QEMU opens itself (librbd), on a real Ceph
cluster and real KVM guests: no host step, ``new_size`` required."""

from __future__ import annotations

import pytest

from hostagent.client import ApiError
from tests.ceph.cluster import CephCluster
from tests.ceph.test_rbd_attach import POOL, USER, rbd_info
from tests.conftest import DaemonFactory
from tests.integration.support import Guests, unique
from tests.integration.test_extend import qemu_size

MIB = 1024 * 1024


@pytest.fixture
def image(ceph_cluster: CephCluster) -> str:
    ceph_cluster.create_pool(POOL)
    return ceph_cluster.create_image(POOL, unique("vol"), size_mb=32)


def test_rbd_resize_then_extend_resizes_both_guests(
    daemon_factory: DaemonFactory, guests: Guests, ceph_cluster: CephCluster, image: str
) -> None:
    key = ceph_cluster.client_key(USER, POOL)
    client = daemon_factory().client
    pair = [guests.make(), guests.make(persistent=True)]
    ids = [unique("att") for _ in pair]
    body = {
        "volume_id": image.split("/")[1],
        "multiattach": True,
        "connection_info": rbd_info(ceph_cluster, image, key=key),
    }
    for attachment_id, guest in zip(ids, pair, strict=True):
        client.attach(attachment_id, {**body, "domain": guest.name})
        assert qemu_size(guest, f"ua-{attachment_id}") == 32 * MIB

    ceph_cluster.rbd("resize", "--no-progress", "--size", "64M", image)
    with pytest.raises(ApiError) as no_size:
        client.extend(ids[0])
    assert (no_size.value.status, no_size.value.code) == (400, "invalid_request")
    assert "new_size is required" in no_size.value.message

    result = client.extend(ids[1], 64 * MIB)
    assert result.connection_key == f"rbd:ceph/{image}"
    assert result.device_size == 64 * MIB
    assert sorted(g.attachment_id for g in result.guests) == sorted(ids)
    assert all(g.resized and g.size == 64 * MIB for g in result.guests)
    for attachment_id, guest in zip(ids, pair, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 64 * MIB
    assert "size 64 MiB" in ceph_cluster.rbd("info", image)

    again = client.extend(ids[0], 64 * MIB)
    assert not any(g.resized for g in again.guests)
    with pytest.raises(ApiError) as shrink:
        client.extend(ids[0], 48 * MIB)
    assert shrink.value.status == 400
