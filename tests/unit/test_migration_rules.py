"""Live migration hand-off (API.md v1.1): the alias as recorded data, incoming
attachments, arrival, the source's release and the abandoned incoming, one
rule per test, on the core between recording fakes of libvirt and os-brick."""

from __future__ import annotations

import dataclasses

from hostagent.attachments.rebuild import unrecorded_disks
from hostagent.state.store import AttachmentState
from tests.unit.conftest import Core


def test_every_read_reports_the_recorded_alias(core: Core) -> None:
    guest = core.guests.define("g1")
    attachment, _ = core.service.attach("a1", core.request(guest))
    assert attachment.alias == "ua-a1"
    record = core.store.get_attachment("a1")
    assert record is not None and record.alias == "ua-a1"


def test_a_disk_whose_alias_is_not_its_attachment_id_counts_as_recorded(core: Core) -> None:
    """A migrated disk keeps the source's alias: rebuild must not adopt it twice."""
    guest = core.guests.define("g1")
    core.guests.add_disk(guest, core.device, alias="ua-from-source", dev="vdb")
    assert [f.disk.alias for f in unrecorded_disks(core.store, core.guests)] == [
        "ua-from-source"
    ]
    core.service.attach("a1", core.request(guest))
    record = core.store.get_attachment("a1")
    assert record is not None
    # the recorded alias, not the id, is what names the disk
    core.store.forget_attachment("a1")
    core.store.adopt(
        dataclasses.replace(record, alias="ua-from-source", state=AttachmentState.ATTACHED),
        core.store.get_connection(core.key),  # type: ignore[arg-type]
    )
    assert [f.disk.alias for f in unrecorded_disks(core.store, core.guests)] == ["ua-a1"]
