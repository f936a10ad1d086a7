"""A guest's side of an attach: pick the target dev and address, build the
disk XML with libvirt_xml's policy, make sure a virtio-scsi controller
exists, and hand the disk to libvirt for the live domain and its config."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Final

from hostagent import failpoints
from hostagent.api.models import AttachRequest
from hostagent.attachments.qos import iotune_from_qos_specs
from hostagent.attachments.render import disk_source
from hostagent.connectors import HostDevice, Target
from hostagent.errors import LibvirtError, TargetDevInUse
from hostagent.guests.disk_presence import DiskPresence, Presence, presence_in_views
from hostagent.guests.domains import DomainInfo, Guests
from hostagent.libvirt_xml.disk import (
    ControllerSpec,
    DomainDevices,
    DriveAddress,
    parse_domain,
)
from hostagent.libvirt_xml.placement import first_free_drive_address, first_free_target_dev
from hostagent.libvirt_xml.policy import BlockSource, DiskRequest, build_disk
from hostagent.locks import HostLocks
from hostagent.observability.metrics import Metrics
from hostagent.state.store import AttachmentRecord, Store

LOG = logging.getLogger(__name__)

VIRTIO_SCSI = "virtio-scsi"
_PLACEMENT_ATTEMPTS = 16
_HIDDEN_DEVICE_MARKERS = ("lun already used", "Duplicate nodes with node-name")
# [DEFAULT] disk_discard: pass a guest's discards on when connection_info allows them
DISCARD_POLICIES: Final = ("unmap", "ignore")


def wants_discard(request: AttachRequest, disk_discard: str) -> bool:
    """Cinder says the volume takes discards (``discard: true``, as its RBD
    driver does) and the host's ``disk_discard`` lets them through."""
    return request.connection_info.data.get("discard") is True and disk_discard == "unmap"


def validate_disk_rules(request: AttachRequest, target: Target) -> None:
    """Run the disk policy on the request alone, so its refusals are 400s
    raised before libvirt or the host is touched (raises DiskPolicyError)."""
    build_disk(
        DiskRequest(
            attachment_id="validate",
            serial=request.serial or request.volume_id,
            source=BlockSource(dev="/dev/null"),
            disk_format=target.disk_format,
            multiattach=request.multiattach,
            mode=request.mode,
            bus=request.bus,
            target_dev=request.target_dev or first_free_target_dev(request.bus, ()),
            address=DriveAddress(0, 0, 0, 0) if request.bus == "scsi" else None,
            iotune=iotune_from_qos_specs(request.connection_info.data.get("qos_specs")),
        )
    )


class _DomainView:
    """The live XML and the persistent config of one domain, read once."""

    def __init__(self, guests: Guests, domain: DomainInfo) -> None:
        self.domain = domain
        self.live: DomainDevices | None = (
            parse_domain(guests.domain_xml(domain.uuid)) if domain.active else None
        )
        self.config: DomainDevices | None = (
            parse_domain(guests.domain_xml(domain.uuid, inactive=True))
            if domain.persistent
            else None
        )

    def views(self) -> list[DomainDevices]:
        return [v for v in (self.live, self.config) if v is not None]

    def presence(self, alias: str) -> Presence:
        return presence_in_views(self.live, self.config, alias)

    def target_devs(self) -> set[str]:
        return {d.target_dev for v in self.views() for d in v.disks if d.target_dev}

    def drive_addresses(self, controller: int) -> set[DriveAddress]:
        return {
            d.address
            for v in self.views()
            for d in v.disks
            if d.address is not None and d.address.controller == controller
        }

    def scsi_controller_indexes(self) -> tuple[set[int], set[int]]:
        """(virtio-scsi indexes in live, in config); a missing view counts as 'has all'."""
        live = set(self.live.scsi_controller_indexes()) if self.live else None
        config = set(self.config.scsi_controller_indexes()) if self.config else None
        everything = (live or set()) | (config or set())
        return (everything if live is None else live, everything if config is None else config)

    def used_scsi_indexes(self) -> set[int]:
        return {
            c.index for v in self.views() for c in v.controllers if c.controller_type == "scsi"
        }


class GuestDisks:
    """Builds and attaches the disk of an attachment on its domain."""

    def __init__(
        self,
        *,
        guests: Guests,
        store: Store,
        locks: HostLocks,
        metrics: Metrics,
        disk_discard: str = "unmap",
    ) -> None:
        if disk_discard not in DISCARD_POLICIES:
            raise ValueError(
                f"disk_discard must be one of {DISCARD_POLICIES}, not {disk_discard!r}"
            )
        self.disk_discard = disk_discard
        self.guests = guests
        self.store = store
        self.locks = locks
        self.metrics = metrics
        self._presence = DiskPresence(guests)

    def attach(
        self,
        record: AttachmentRecord,
        request: AttachRequest,
        target: Target,
        device: HostDevice,
        domain: DomainInfo,
    ) -> AttachmentRecord:
        """Attach the record's disk to whatever of live/config does not have it yet."""
        with self.locks.domain(record.domain_uuid):
            view = _DomainView(self.guests, domain)
            in_live, in_config = view.presence(record.alias)
            need_live = domain.active and not in_live
            need_config = domain.persistent and not in_config
            if not (need_live or need_config):
                return record
            if record.disk_xml is not None and (in_live or in_config):
                # finish a half-done attach with the same disk
                with self.metrics.phase("libvirt_attach"):
                    self.guests.attach_device(
                        domain.uuid, record.disk_xml, live=need_live, config=need_config
                    )
            else:
                record = self._place_and_attach(
                    record=record,
                    request=request,
                    target=target,
                    device=device,
                    view=view,
                    live=need_live,
                    config=need_config,
                )
            failpoints.hit("attach.after_libvirt")
            return record

    def finish_interrupted(self, record: AttachmentRecord, domain: DomainInfo) -> None:
        """Reconcile: an attach died after libvirt took the disk (maybe only live
        or only config): give the rest of the domain the same disk."""
        assert record.disk_xml is not None
        with self.locks.domain(domain.uuid):
            in_live, in_config = self._presence.of(domain, record.alias)
            need_live, need_config = (
                domain.active and not in_live,
                domain.persistent and not in_config,
            )
            if need_live or need_config:
                self.guests.attach_device(
                    domain.uuid, record.disk_xml, live=need_live, config=need_config
                )

    def _place_and_attach(
        self,
        *,
        record: AttachmentRecord,
        request: AttachRequest,
        target: Target,
        device: HostDevice,
        view: _DomainView,
        live: bool,
        config: bool,
    ) -> AttachmentRecord:
        """Attach at the first free place; step past places QEMU holds unknown to
        libvirt. Returns the record with the placement it recorded.

        A libvirtd killed in the middle of a hot-plug can leave a disk in QEMU
        that the restarted libvirtd does not show: QEMU then refuses its unit
        ("lun already used") or libvirt reuses a node name ("Duplicate nodes").
        Both are retried a bounded number of times on the next unit.
        """
        skipped: set[DriveAddress] = set()
        for _ in range(_PLACEMENT_ATTEMPTS):
            target_dev, disk_xml, address = self._place(
                record=record,
                request=request,
                target=target,
                device=device,
                view=view,
                skipped=skipped,
            )
            try:
                with self.metrics.phase("libvirt_attach"):
                    self.guests.attach_device(view.domain.uuid, disk_xml, live=live, config=config)
                return replace(record, target_dev=target_dev, disk_xml=disk_xml)
            except LibvirtError as exc:
                if not any(marker in exc.message for marker in _HIDDEN_DEVICE_MARKERS):
                    raise
                LOG.warning(
                    "attachment %s: %s refused %s (%s); QEMU holds a device libvirt does not "
                    "show, left by an interrupted hot-plug; trying the next unit",
                    record.attachment_id,
                    view.domain.name,
                    address,
                    exc.message,
                )
                if address is not None:
                    skipped.add(address)
        raise LibvirtError(
            f"{view.domain.name}: QEMU kept refusing the disk after {_PLACEMENT_ATTEMPTS} "
            "places (devices left in QEMU by an interrupted hot-plug?); restarting the "
            "guest clears them"
        )

    def _place(
        self,
        *,
        record: AttachmentRecord,
        request: AttachRequest,
        target: Target,
        device: HostDevice,
        view: _DomainView,
        skipped: set[DriveAddress],
    ) -> tuple[str, str, DriveAddress | None]:
        """Choose the target dev (and SCSI address), build the disk and record
        both before libvirt is asked: (target dev, disk XML, address)."""
        used_devs = view.target_devs() | {
            a.target_dev
            for a in self.store.list_attachments(domain_uuid=record.domain_uuid)
            if a.target_dev and a.attachment_id != record.attachment_id
        }
        if request.target_dev is not None:
            if request.target_dev in used_devs:
                raise TargetDevInUse(
                    f"target dev {request.target_dev} is already used on {record.domain_name}"
                )
            target_dev = request.target_dev
        else:
            target_dev = first_free_target_dev(request.bus, used_devs)
        address = None
        if request.bus == "scsi":
            controller = self._ensure_virtio_scsi(view)
            address = first_free_drive_address(
                controller, view.drive_addresses(controller) | skipped
            )
        disk = build_disk(
            DiskRequest(
                attachment_id=record.attachment_id,
                serial=record.serial,
                source=disk_source(target, device),
                disk_format=target.disk_format,
                multiattach=record.multiattach,
                mode=record.mode,
                bus=record.bus,
                target_dev=target_dev,
                address=address,
                iotune=iotune_from_qos_specs(request.connection_info.data.get("qos_specs")),
                discard=wants_discard(request, self.disk_discard),
            )
        )
        disk_xml = disk.to_xml()
        self.store.set_attachment_placement(
            record.attachment_id, target_dev=target_dev, disk_xml=disk_xml
        )
        failpoints.hit("attach.after_placement")
        return target_dev, disk_xml, address

    def _ensure_virtio_scsi(self, view: _DomainView) -> int:
        """Index of a virtio-scsi controller in both live and config, hot-adding one if needed."""
        live, config = view.scsi_controller_indexes()
        shared = live & config
        if shared:
            return min(shared)
        domain = view.domain
        if live or config:
            index = min(live or config)
            add_live, add_config = index not in live, index not in config
        else:
            used = view.used_scsi_indexes()
            index = next(i for i in range(len(used) + 1) if i not in used)
            add_live, add_config = domain.active, domain.persistent
        xml = ControllerSpec(controller_type="scsi", index=index, model=VIRTIO_SCSI).to_xml()
        LOG.info(
            "domain %s has no virtio-scsi controller %d%s; adding one",
            domain.name,
            index,
            " in its live XML" if add_live else " in its config",
        )
        try:
            self.guests.attach_device(
                domain.uuid,
                xml,
                live=add_live and domain.active,
                config=add_config and domain.persistent,
            )
        except LibvirtError as exc:
            raise LibvirtError(
                f"domain {domain.name} has no virtio-scsi controller and libvirt refused "
                f"to add one: {exc.message}"
            ) from None
        return index
