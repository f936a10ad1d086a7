"""A domain undefined and defined again, or renamed (issue 14, items 1 and 2):
reconcile's rules, on the core between recording fakes."""

from __future__ import annotations

import dataclasses

from hostagent.guests.domains import DomainInfo
from tests.unit.conftest import Core


def absent_for(core: Core, domain: DomainInfo, lookups: int) -> None:
    """The next ``lookups`` lookups of ``domain`` find nothing (it is undefined),
    later ones find it again (defined again with the same UUID and config)."""
    real_find = core.guests.find
    left = [lookups]

    def find(domain_uuid: str) -> DomainInfo | None:
        if domain_uuid == domain.uuid and left[0] > 0:
            left[0] -= 1
            return None
        return real_find(domain_uuid)

    core.guests.find = find  # type: ignore[method-assign]


def test_a_shared_release_meets_the_domain_defined_again_and_keeps_it(core: Core) -> None:
    """No guard scan on a connection others still use: the release itself asks
    again right before it drops the record."""
    guest, other = core.guests.define("g1", active=False), core.guests.define("g2")
    core.service.attach("a1", core.request(guest, multiattach=True))
    core.service.attach("a2", core.request(other, multiattach=True))
    absent_for(core, guest, lookups=2)  # domain_gone's and the attachment's lookups

    actions = core.reconciler.domain_gone(guest.uuid)

    assert [(a.action, a.subject) for a in actions] == [("domain_back", "a1")]
    assert core.store.get_attachment("a1") is not None
    assert core.store.get_tombstone("a1") is None
    assert core.store.refcount(core.key) == 2


def test_a_define_records_the_domains_new_name(core: Core) -> None:
    guest = core.guests.define("g1", active=False)
    core.service.attach("a1", core.request(guest))
    renamed = dataclasses.replace(guest, name="g1-new")
    core.guests._domains[guest.uuid].info = renamed  # virsh domrename g1 g1-new

    actions = core.reconciler.domain_defined(guest.uuid)

    assert [(a.action, a.detail) for a in actions] == [
        ("domain_renamed", "domain g1 is now g1-new")
    ]
    record = core.store.get_attachment("a1")
    assert record is not None and record.domain_name == "g1-new"
    assert core.reconciler.run().actions == [], "reconcile agrees"
