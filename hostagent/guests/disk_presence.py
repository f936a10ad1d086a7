"""Where a domain holds a disk, named by its alias: in its live XML, in its
persistent config. The one reading of it, for attach, detach, reconcile and
the doctor alike."""

from __future__ import annotations

from collections.abc import Iterable

from hostagent.errors import DomainNotFound
from hostagent.guests.domain_scan import DomainDisk
from hostagent.guests.domains import DomainInfo, Guests
from hostagent.libvirt_xml.disk import DomainDevices, parse_disk_refs

# (in the live XML, in the persistent config)
Presence = tuple[bool, bool]


class DiskPresence:
    """Asks libvirt where a domain holds a disk alias right now."""

    def __init__(self, guests: Guests) -> None:
        self._guests = guests

    def of(self, domain: DomainInfo, alias: str) -> Presence:
        """Reads the live XML only of a running domain, the config only of a persistent one."""
        in_live = domain.active and _names(self._guests.domain_xml(domain.uuid), alias)
        in_config = domain.persistent and _names(
            self._guests.domain_xml(domain.uuid, inactive=True), alias
        )
        return in_live, in_config

    def find(self, domain_uuid: str, alias: str) -> Presence | None:
        """As ``of``, for the domain as libvirt has it now; None if it is gone."""
        domain = self._guests.find(domain_uuid)
        if domain is None:
            return None
        return self.of(domain, alias)

    def in_live_xml(self, domain_uuid: str, alias: str) -> bool:
        """Whether the live XML names the alias now, whatever the domain was when
        looked up (a guest may have started since); False once the domain is gone."""
        try:
            xml = self._guests.domain_xml(domain_uuid)
        except DomainNotFound:
            return False
        return _names(xml, alias)


def presence_in_views(
    live: DomainDevices | None, config: DomainDevices | None, alias: str
) -> Presence:
    """From a domain's live XML and config already parsed (None: not read, the
    domain is not running / not persistent)."""
    return (
        live is not None and live.disk_by_alias(alias) is not None,
        config is not None and config.disk_by_alias(alias) is not None,
    )


def presence_in_scan(disks: Iterable[DomainDisk], domain_uuid: str, alias: str) -> Presence:
    """From a scan of every domain (``domain_scan``), with no read of its own."""
    held = {dd.where for dd in disks if dd.domain.uuid == domain_uuid and dd.disk.alias == alias}
    return "live" in held, "config" in held


def _names(xml: str, alias: str) -> bool:
    return parse_disk_refs(xml).has_alias(alias)
