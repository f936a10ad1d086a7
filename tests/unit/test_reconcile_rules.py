"""attachments/reconcile.py: what a pass makes of each record, one rule per test.

Interrupted steps are made by a ``SimulatedCrash`` at the libvirt boundary
(the daemon dying there); the records and domains it leaves are real.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import pytest

from hostagent.api.models import ReconcileAction
from hostagent.attachments import reconcile
from hostagent.guests.domain_scan import DomainSnapshot
from hostagent.state.store import AttachmentState, AttachmentSummary
from tests.unit.conftest import Core
from tests.unit.recording import SimulatedCrash


def actions(core: Core) -> list[tuple[str, str]]:
    return [(a.action, a.subject) for a in core.reconciler.run().actions]


def crashed_attach(core: Core, attachment_id: str, when: Literal["before", "after"]) -> None:
    """An attach whose daemon died just ``when`` libvirt took the disk."""
    guest = core.guests.lookup("g1")
    core.guests.crash_on_attach = when
    with pytest.raises(SimulatedCrash):
        core.service.attach(attachment_id, core.request(guest))
    core.guests.crash_on_attach = None


def test_a_pass_over_agreeing_records_does_nothing(core: Core) -> None:
    core.service.attach("a1", core.request(core.guests.define("g1")))
    assert actions(core) == []


def test_an_interrupted_attach_whose_disk_is_on_the_domain_is_finished(core: Core) -> None:
    guest = core.guests.define("g1")
    crashed_attach(core, "a1", "after")
    core.guests.drop_disk(guest, "ua-a1", "config")  # libvirt had taken it live only
    assert actions(core) == [("finished_attach", "a1")]
    record = core.store.get_attachment("a1")
    assert record is not None and record.state is AttachmentState.ATTACHED
    assert core.guests.holds(guest, "ua-a1") == (True, True), "the config got it too"


def test_an_interrupted_attach_that_left_no_disk_is_rolled_back(core: Core) -> None:
    core.guests.define("g1")
    crashed_attach(core, "a1", "before")
    assert actions(core) == [("rolled_back", "a1")]
    assert core.store.get_attachment("a1") is None
    assert core.store.get_tombstone("a1") is None, "the id may be used again"
    assert core.connector.disconnects == [core.key]


def test_the_attachment_of_a_vanished_domain_is_released(core: Core) -> None:
    guest = core.guests.define("g1", persistent=False)
    core.service.attach("a1", core.request(guest))
    core.guests.vanish(guest)
    report = core.reconciler.run()
    assert [(a.action, a.subject) for a in report.actions] == [("released", "a1")]
    assert "terminate_connection=True" in report.actions[0].detail
    assert core.connector.disconnects == [core.key]
    tombstone = core.store.get_tombstone("a1")
    assert tombstone is not None and tombstone.result["terminate_connection"] is True


def test_a_domain_that_only_stopped_keeps_its_attachment(core: Core) -> None:
    guest = core.guests.define("g1", active=False)
    core.service.attach("a1", core.request(guest))
    assert core.reconciler.domain_gone(guest.uuid) == []
    assert actions(core) == []
    assert core.connector.disconnects == []


def test_an_attached_disk_the_domain_lost_is_reported_not_released(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    core.guests.drop_disk(guest, "ua-a1", "live")
    core.guests.drop_disk(guest, "ua-a1", "config")
    assert actions(core) == [("missing_disk", "a1")]
    assert core.store.get_attachment("a1") is not None
    assert core.connector.disconnects == []


def test_an_unused_connection_is_disconnected(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    # what a rollback whose disconnect failed leaves: no disk, no record, a connection
    core.guests.drop_disk(guest, "ua-a1", "live")
    core.guests.drop_disk(guest, "ua-a1", "config")
    core.store.forget_attachment("a1")
    registry = core.service.metrics.registry
    guards = {"phase": "guard"}
    assert registry.get_sample_value("hostagent_phase_seconds_count", guards) == 0
    assert actions(core) == [("disconnected", core.key)]
    assert core.store.get_connection(core.key) is None
    # the look for users before that disconnect is timed for /metrics
    assert registry.get_sample_value("hostagent_phase_seconds_count", guards) == 1


def test_an_unused_connection_a_domain_names_is_kept(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    core.store.forget_attachment("a1")  # its disk stays on g1
    report = core.reconciler.run()
    assert report.actions == [
        ReconcileAction(
            action="kept",
            subject=core.key,
            detail="no attachments, but used by domain g1 (live, disk ua-a1); "
            "domain g1 (config, disk ua-a1)",
        ),
        ReconcileAction(
            action="foreign_disk",
            subject=core.key,
            detail=f"domain g1 (live) uses {core.device} as vda without an attachment of "
            "ours; the device stays connected",
        ),
        ReconcileAction(
            action="foreign_disk",
            subject=core.key,
            detail=f"domain g1 (config) uses {core.device} as vda without an attachment of "
            "ours; the device stays connected",
        ),
    ]
    assert core.connector.disconnects == []


def test_a_connection_of_an_earlier_boot_is_connected_again_for_a_guest_that_holds_it(
    core: Core,
) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    after = core.again(boot_id="boot-b")
    assert actions(after) == [("reconnected_after_reboot", after.key)]
    assert after.connector.connects == [after.key, after.key]
    connection = after.store.get_connection(after.key)
    assert connection is not None and connection.boot_id == "boot-b"
    after.store.close()


def test_a_connection_of_an_earlier_boot_whose_guest_is_gone_is_dropped_without_a_disconnect(
    core: Core,
) -> None:
    guest = core.guests.define("g1", persistent=False)
    core.service.attach("a1", core.request(guest))
    core.guests.vanish(guest)
    after = core.again(boot_id="boot-b")
    assert actions(after) == [("released_after_reboot", "a1")]
    assert after.connector.disconnects == [], "the reboot took it down already"
    assert after.store.get_connection(after.key) is None
    after.store.close()


def test_tombstones_older_than_their_ttl_are_purged(core: Core) -> None:
    core.service.attach("a1", core.request(core.guests.define("g1")))
    core.service.detach("a1")
    core.clock[0] += 3600 + 1
    assert actions(core) == [("purged_tombstones", "tombstones")]
    assert core.store.get_tombstone("a1") is None


def test_an_interrupted_detach_whose_disk_is_still_there_waits(core: Core) -> None:
    core.service.attach("a1", core.request(core.guests.define("g1")))
    core.store.set_attachment_state("a1", AttachmentState.DETACHING)
    assert actions(core) == [("detach_pending", "a1")]
    assert core.connector.disconnects == []


def test_an_interrupted_detach_whose_disk_is_gone_is_finished(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    core.store.set_attachment_state("a1", AttachmentState.DETACHING)
    core.guests.drop_disk(guest, "ua-a1", "live")
    core.guests.drop_disk(guest, "ua-a1", "config")
    assert actions(core) == [("finished_detach", "a1")]
    assert core.connector.disconnects == [core.key]


# a pass whose inputs did not change since one that found everything settled


@pytest.fixture
def settled_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The attachment ids a pass checks against its snapshot."""
    checked: list[str] = []
    real = reconcile._settled

    def counted(record: AttachmentSummary, snapshot: DomainSnapshot) -> bool:
        checked.append(record.attachment_id)
        return real(record, snapshot)

    monkeypatch.setattr(reconcile, "_settled", counted)
    return checked


def test_a_pass_that_finds_what_a_settled_pass_found_checks_no_record_again(
    core: Core, settled_checks: list[str]
) -> None:
    core.service.attach("a1", core.request(core.guests.define("g1"), multiattach=True))
    core.service.attach("a2", core.request(core.guests.define("g2"), multiattach=True))
    assert actions(core) == []
    assert sorted(settled_checks) == ["a1", "a2"]
    settled_checks.clear()
    assert actions(core) == []
    assert settled_checks == [], "same rows, same names and disks: the same answer"


def test_a_disk_lost_after_a_settled_pass_is_still_found(
    core: Core, settled_checks: list[str]
) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    assert actions(core) == []
    core.guests.drop_disk(guest, "ua-a1", "live")
    core.guests.drop_disk(guest, "ua-a1", "config")
    assert actions(core) == [("missing_disk", "a1")]


def test_a_domain_renamed_after_a_settled_pass_is_looked_at(
    core: Core, settled_checks: list[str]
) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    assert actions(core) == []
    state = core.guests._domains[guest.uuid]
    state.info = replace(state.info, name="g1-renamed")  # virsh domrename, as libvirt has it
    assert actions(core) == [("domain_renamed", "a1")]


def test_a_record_written_after_a_settled_pass_is_looked_at(
    core: Core, settled_checks: list[str]
) -> None:
    core.service.attach("a1", core.request(core.guests.define("g1")))
    assert actions(core) == []
    core.store.set_attachment_state("a1", AttachmentState.DETACHING)
    assert actions(core) == [("detach_pending", "a1")]


def test_a_pass_that_acted_is_not_taken_as_settled(core: Core, settled_checks: list[str]) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    core.guests.drop_disk(guest, "ua-a1", "live")
    core.guests.drop_disk(guest, "ua-a1", "config")
    assert actions(core) == [("missing_disk", "a1")]
    assert actions(core) == [("missing_disk", "a1")], "reported again: still not settled"
