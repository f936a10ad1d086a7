"""Reads of every domain's live XML and persistent config, for what must see
every disk on the host (``host.device_users``, reconcile, rebuild, doctor)."""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from hostagent.errors import DomainNotFound
from hostagent.guests.domains import DomainInfo, Guests
from hostagent.libvirt_xml.disk import DiskRef, parse_disk_refs


@dataclass(frozen=True)
class DomainDisk:
    """One disk of one domain, from its live XML or its persistent config."""

    domain: DomainInfo
    where: Literal["live", "config"]
    disk: DiskRef


@dataclass(frozen=True)
class DomainXml:
    """A domain's live XML or its persistent config, as libvirt gave it."""

    domain: DomainInfo
    where: Literal["live", "config"]
    xml: str


def _xml_of(guests: Guests, domain: DomainInfo) -> list[DomainXml]:
    views: list[DomainXml] = []
    try:
        if domain.active:
            views.append(DomainXml(domain, "live", guests.domain_xml(domain.uuid)))
        if domain.persistent:
            config = guests.domain_xml(domain.uuid, inactive=True)
            views.append(DomainXml(domain, "config", config))
    except DomainNotFound:  # undefined while we looked: it holds nothing any more
        return []
    return views


# XML of many domains is fetched concurrently: the round trips overlap on
# libvirt's one (thread-safe) connection.
_FETCHERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="domain-scan")


def scan_domain_xml(guests: Guests, *, fetchers: Executor = _FETCHERS) -> list[DomainXml]:
    """The live XML and persistent config of every domain, skipping domains
    undefined since the listing; ``fetchers`` reads several domains at once.

    Raises LibvirtUnavailable if libvirt cannot be asked: no answer is never
    taken as "unused".
    """
    domains = guests.list_domains()
    if len(domains) <= 1:
        return [view for domain in domains for view in _xml_of(guests, domain)]
    per_domain = fetchers.map(lambda domain: _xml_of(guests, domain), domains)
    return [view for views in per_domain for view in views]


def scan_domain_disks(guests: Guests, *, fetchers: Executor = _FETCHERS) -> list[DomainDisk]:
    """Every disk of every domain, live and config (see ``scan_domain_xml``)."""
    return [
        DomainDisk(view.domain, view.where, disk)
        for view in scan_domain_xml(guests, fetchers=fetchers)
        for disk in parse_disk_refs(view.xml).disks
    ]
