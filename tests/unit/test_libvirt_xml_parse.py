"""parse_domain on libvirt's own output and on hand-made edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.libvirt_xml.disk import (
    _LAYERED_DISKS,
    ControllerSpec,
    DiskSpec,
    DomainDevices,
    DriveAddress,
    SourceHost,
    _layers,
    parse_disk_refs,
    parse_domain,
)
from hostagent.libvirt_xml.xmlmodel import XmlModelError, parse_xml

LIVE_XML = Path(__file__).resolve().parent.parent / "data" / "xml" / "parse-live-domain-in.xml"
SDA_ALIAS = "ua-0f3c2b1a-1111-2222-3333-444455556666"
VDB_ALIAS = "ua-7d1e9a40-aaaa-bbbb-cccc-ddddeeeeffff"
RBD_ALIAS = "ua-c0ffee00-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
def live() -> DomainDevices:
    return parse_domain(LIVE_XML.read_text())


def test_uuid_and_name(live: DomainDevices) -> None:
    assert live.uuid == "4924fe8c-21fd-42db-b3ae-e3a4de57ef34"
    assert live.name == "xmlcheck-1"


def test_disks_in_document_order(live: DomainDevices) -> None:
    assert [d.target_dev for d in live.disks] == ["sda", "sdb", "vdb", "sdc"]
    assert [d.disk_type for d in live.disks] == ["block", "file", "block", "network"]


def test_live_only_details_are_ignored(live: DomainDevices) -> None:
    """<source index='1'/> and <backingStore/> do not change what we read."""
    sda = live.disk_by_alias(SDA_ALIAS)
    assert sda == DiskSpec(
        disk_type="block",
        driver_type="raw",
        driver_cache="none",
        driver_io="native",
        source_dev="/dev/loop0",
        target_dev="sda",
        target_bus="scsi",
        shareable=True,
        serial="vol-abc123",
        alias=SDA_ALIAS,
        address=DriveAddress(0, 0, 0, 3),
    )


def test_aliases(live: DomainDevices) -> None:
    assert [d.alias for d in live.disks] == [SDA_ALIAS, "scsi0-0-0-1", VDB_ALIAS, RBD_ALIAS]


def test_file_disk_shows_its_host_path(live: DomainDevices) -> None:
    sdb = live.disk_by_alias("scsi0-0-0-1")
    assert sdb is not None
    assert (sdb.source_file, sdb.source_dev) == ("/tmp/xmlcheck/file1.qcow2", None)
    assert (sdb.driver_cache, sdb.serial) == (None, None)


def test_pci_address_is_not_a_drive_address(live: DomainDevices) -> None:
    vdb = live.disk_by_alias(VDB_ALIAS)
    assert vdb is not None
    assert vdb.address is None
    assert vdb.readonly is True


def test_network_disk(live: DomainDevices) -> None:
    rbd = live.disk_by_alias(RBD_ALIAS)
    assert rbd is not None
    assert (rbd.source_protocol, rbd.source_name) == ("rbd", "volumes/volume-42")
    assert rbd.source_hosts == tuple(SourceHost(f"10.0.0.{n}", "6789") for n in (11, 12, 13))
    assert (rbd.auth_username, rbd.auth_secret_type) == ("cinder", "ceph")
    assert rbd.address == DriveAddress(0, 0, 0, 2)


def test_disk_by_alias_unknown(live: DomainDevices) -> None:
    assert live.disk_by_alias("ua-nope") is None
    assert live.disk_by_alias("") is None


def test_controllers(live: DomainDevices) -> None:
    assert live.controllers[0] == ControllerSpec("scsi", 0, "virtio-scsi")
    assert ControllerSpec("sata", 0, None) in live.controllers
    assert [c.index for c in live.controllers if c.controller_type == "pci"] == [0, 1, 2, 3, 4]
    assert live.scsi_controller_indexes() == (0,)


def test_scsi_controller_indexes_only_virtio_scsi_sorted() -> None:
    devices = parse_domain(
        "<domain><uuid>u</uuid><name>n</name><devices>"
        "<controller type='scsi' index='3' model='virtio-scsi'/>"
        "<controller type='scsi' index='1' model='lsilogic'/>"
        "<controller type='scsi' index='0' model='virtio-scsi'/>"
        "<controller type='scsi' index='2'/>"
        "<controller type='virtio-serial' index='5' model='virtio-scsi'/>"
        "</devices></domain>"
    )
    assert devices.scsi_controller_indexes() == (0, 3)


def test_domain_without_devices() -> None:
    devices = parse_domain(b"<domain type='kvm'><name>n</name><uuid>u</uuid></domain>")
    assert devices == DomainDevices(uuid="u", name="n", disks=(), controllers=())
    assert devices.scsi_controller_indexes() == ()


def test_unusual_disks_still_parse() -> None:
    """An empty cdrom, a volume disk and an NBD unix-socket host do not break parsing."""
    devices = parse_domain(
        "<domain><uuid>u</uuid><name>n</name><devices>"
        "<disk type='file' device='cdrom'><target dev='sdz' bus='sata'/><readonly/></disk>"
        "<disk type='volume'><source pool='p' volume='v'/><target dev='vdq'/></disk>"
        "<disk type='network'><source protocol='nbd' name='x'>"
        "<host transport='unix' socket='/run/nbd.sock'/></source><target dev='vdr'/></disk>"
        "</devices></domain>"
    )
    cdrom, volume, nbd = devices.disks
    assert (cdrom.device, cdrom.source_file, cdrom.readonly) == ("cdrom", None, True)
    assert (volume.device, volume.driver_name, volume.target_bus) == ("disk", None, None)
    assert (nbd.source_protocol, nbd.source_hosts) == ("nbd", ())


def test_not_a_domain() -> None:
    with pytest.raises(XmlModelError, match="domain"):
        parse_domain("<disk type='block'/>")


def test_domain_without_uuid() -> None:
    with pytest.raises(XmlModelError, match="uuid"):
        parse_domain("<domain><name>n</name></domain>")


LAYERED = """<domain><devices>
<disk type='file'><source file='/var/lib/overlay.qcow2' index='1'/>
  <backingStore type='block' index='2'><format type='raw'/><source dev='/dev/loop0'/>
    <backingStore/></backingStore>
  <target dev='sdb' bus='scsi'/><alias name='ua-snapshotted'/></disk>
<disk type='block'><source dev='/dev/sdc'/><backingStore/>
  <mirror type='network' job='copy'><format type='raw'/>
    <source protocol='rbd' name='pool/copy'/>
    <backingStore type='block'><source dev='/dev/sdq'/></backingStore></mirror>
  <target dev='sdc' bus='scsi'/><alias name='ua-copying'/></disk>
<disk type='block'><source dev='/dev/sdd'/><backingStore/><target dev='sdd'/></disk>
</devices></domain>"""


def test_disk_refs_name_every_backing_layer_and_block_copy_destination() -> None:
    """An external snapshot leaves the device as the overlay's backing layer, and
    a block copy writes to its mirror: the guard must see both as uses."""
    refs = [
        (d.alias, d.target_dev, d.source_dev or d.source_file or d.source_name, d.layer)
        for d in parse_disk_refs(LAYERED).disks
    ]
    assert refs == [
        ("ua-snapshotted", "sdb", "/var/lib/overlay.qcow2", None),
        ("ua-snapshotted", "sdb", "/dev/loop0", "backing chain"),
        ("ua-copying", "sdc", "/dev/sdc", None),
        ("ua-copying", "sdc", "pool/copy", "block copy"),
        ("ua-copying", "sdc", "/dev/sdq", "block copy"),
        (None, "sdd", "/dev/sdd", None),
    ]
    assert parse_disk_refs(LAYERED).disks[3].source_protocol == "rbd"


def test_disk_refs_of_disks_without_layers_are_their_own_sources() -> None:
    xml = LIVE_XML.read_text()
    assert [
        d.source_dev or d.source_file or d.source_name for d in parse_disk_refs(xml).disks
    ] == [d.source_dev or d.source_file or d.source_name for d in parse_domain(xml).disks]


# One disk each, in the shapes a disk's layers can take.
LAYER_SHAPES = {
    "no layers": "<disk type='block'><source dev='/dev/sda'/></disk>",
    "an empty chain": "<disk type='block'><source dev='/dev/sda'/><backingStore/></disk>",
    "a chain of two": "<disk type='file'><source file='/o.qcow2'/><backingStore type='file'>"
    "<source file='/b.qcow2'/><backingStore type='block'><source dev='/dev/sdb'/>"
    "</backingStore></backingStore></disk>",
    "a copy": "<disk type='block'><source dev='/dev/sda'/><mirror type='block' job='copy'>"
    "<source dev='/dev/sdc'/></mirror></disk>",
    "a copy with no source, only a chain": "<disk type='block'><source dev='/dev/sda'/>"
    "<mirror type='file' job='copy'><backingStore type='block'><source dev='/dev/sdd'/>"
    "</backingStore></mirror></disk>",
    "a chain of an empty layer": "<disk type='block'><source dev='/dev/sda'/><backingStore>"
    "<backingStore><source dev='/dev/sde'/></backingStore></backingStore></disk>",
}


@pytest.mark.parametrize("shape", sorted(LAYER_SHAPES))
def test_the_look_for_layered_disks_finds_every_disk_the_walk_takes_layers_from(
    shape: str,
) -> None:
    """parse_disk_refs looks for disks with layers in one XPath, then walks only
    those: a disk the walk would take a layer from must never be passed over."""
    xml = f"<domain><devices>{LAYER_SHAPES[shape]}</devices></domain>"
    root = parse_xml(xml)
    walked = [source.get("dev") or source.get("file") for source, _ in _layers(root[0][0])]
    if walked:
        assert _LAYERED_DISKS(root), f"{shape}: layers {walked} passed over"
    refs = parse_disk_refs(xml).disks
    assert [r.source_dev or r.source_file for r in refs[1:]] == walked


def test_an_active_commits_base_is_one_use_told_as_its_layer() -> None:
    """libvirt's <mirror job='active-commit'> names the commit's base, which the
    backing chain lists already: one use, as a backing layer. A base the chain
    does not list is told as the commit's."""
    chain = "<backingStore type='block'><source dev='/dev/sdb'/></backingStore>"
    committing = (
        "<domain><devices><disk type='file'><source file='/top.qcow2'/>{chain}"
        "<mirror type='block' job='active-commit'><source dev='/dev/sdb'/></mirror>"
        "<target dev='vdb'/></disk></devices></domain>"
    )
    listed = parse_disk_refs(committing.format(chain=chain)).disks
    assert [(d.source_dev or d.source_file, d.layer) for d in listed] == [
        ("/top.qcow2", None),
        ("/dev/sdb", "backing chain"),
    ]
    unlisted = parse_disk_refs(committing.format(chain="")).disks
    assert [(d.source_dev or d.source_file, d.layer) for d in unlisted] == [
        ("/top.qcow2", None),
        ("/dev/sdb", "block commit"),
    ]
