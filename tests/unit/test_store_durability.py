"""Which commits are fsync'd, and what a power cut that loses the others leaves.

Only intents are committed ``synchronous=FULL``; a few completions are
``NORMAL`` (``state_file.Sync``). The first tests record, through sqlite's
trace callback on the real store, the level each commit of an attach and
detach ran at, so no change can make an intent NORMAL unnoticed. The power
cut tests keep a copy of the file as of each FULL commit (what survives when
every later NORMAL commit is lost), reboot on it, and check that reconcile
and the caller's retry give the answer the caller already had.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from hostagent.connectors import HostDevice, Target
from hostagent.errors import LibvirtError
from hostagent.state.store import Sync
from tests.unit.conftest import Core, make_core
from tests.unit.recording import RecordingGuests

_LEVELS = {"1": "NORMAL", "2": "FULL", "NORMAL": "NORMAL", "FULL": "FULL"}


@dataclass
class CommitLog:
    """The writer's statements, grouped per committed transaction, with the
    ``synchronous`` level in force at its COMMIT."""

    level: str = "FULL"  # what open_state_file sets
    statements: list[str] = field(default_factory=list)
    commits: list[tuple[str, str]] = field(default_factory=list)  # (level, first write)

    def __call__(self, sql: str) -> None:
        if sql.startswith("PRAGMA synchronous="):
            self.level = _LEVELS[sql.split("=", 1)[1].upper()]
        elif sql == "BEGIN IMMEDIATE":
            self.statements = []
        elif sql == "COMMIT":
            first_write = next(
                s for s in self.statements if s.split()[0] in ("INSERT", "UPDATE", "DELETE")
            )
            self.commits.append((self.level, _name(first_write)))
        else:
            self.statements.append(sql)


def _name(sql: str) -> str:
    """A write by its table and what it sets: ``UPDATE attachments state='attached'``."""
    words = sql.split()
    if words[0] == "UPDATE":
        column, value = words[3], words[5].rstrip(",")
        return (
            f"UPDATE {words[1]} {column}={value}"
            if column == "state"
            else f"UPDATE {words[1]} {column}"
        )
    return f"{words[0]} {words[words.index('INTO' if words[0] == 'INSERT' else 'FROM') + 1]}"


@pytest.fixture
def commits(core: Core) -> Iterator[CommitLog]:
    log = CommitLog()
    core.store._db.set_trace_callback(log)
    yield log
    core.store._db.set_trace_callback(None)


def test_every_intent_of_a_last_attach_and_detach_is_fsynced(
    core: Core, commits: CommitLog
) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    core.service.detach("a1")
    assert commits.commits == [
        ("FULL", "INSERT connections"),  # intent: attaching, connecting
        ("NORMAL", "UPDATE connections state='connected'"),  # completion: the device
        ("FULL", "UPDATE attachments target_dev"),  # intent: the disk XML, before libvirt
        ("NORMAL", "UPDATE attachments state='attached'"),  # completion: the 201
        ("FULL", "UPDATE attachments state='detaching'"),  # intent: before the unplug
        ("FULL", "UPDATE connections state='disconnecting'"),  # intent: before os-brick
        ("NORMAL", "DELETE attachments"),  # completion: the tombstone, the 200
    ]


def test_every_intent_of_a_shared_attach_and_detach_is_fsynced(
    core: Core, commits: CommitLog
) -> None:
    first, second = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(first, multiattach=True))
    del commits.commits[:]
    core.service.attach("a2", core.request(second, multiattach=True))
    core.service.detach("a2")
    assert commits.commits == [
        # intent on a connection already up (its row exists: ignored); no act
        # before the next intent, whose fsync carries it
        ("NORMAL", "INSERT connections"),
        ("FULL", "UPDATE attachments target_dev"),  # intent: before libvirt
        ("NORMAL", "UPDATE attachments state='attached'"),
        ("FULL", "UPDATE attachments state='detaching'"),
        ("NORMAL", "DELETE attachments"),  # completion: tombstone, refcount 1
    ]


def test_a_rollback_writes_intents_only(core: Core, commits: CommitLog) -> None:
    guest = core.guests.define("g1")
    core.guests.refuse_attach = "no room"
    with pytest.raises(LibvirtError, match="no room"):
        core.service.attach("a1", core.request(guest))
    assert commits.commits == [
        ("FULL", "INSERT connections"),
        ("NORMAL", "UPDATE connections state='connected'"),
        ("FULL", "UPDATE attachments target_dev"),
        ("FULL", "DELETE attachments"),  # the record forgotten, before the disconnect
        ("FULL", "UPDATE connections state='disconnecting'"),
        ("FULL", "DELETE connections"),
    ]


# every act finds its intent durable


def durable_attachments(durable: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(durable)) as copy:
        return {row[0] for row in copy.execute("SELECT attachment_id FROM attachments")}


@pytest.fixture
def acts_checked(core: Core, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, set[str]]]:
    """Each libvirt attach and each connect, with the attachment ids a power cut
    right then would leave in the state file."""
    durable = power_cut_keeps_intents_only(core)
    acts: list[tuple[str, set[str]]] = []
    attach, connect = core.guests.attach_device, core.connector.connect

    def attach_device(domain_uuid: str, xml: str, *, live: bool, config: bool) -> None:
        acts.append(("attach", durable_attachments(durable)))
        attach(domain_uuid, xml, live=live, config=config)

    def connect_volume(target: Target) -> HostDevice:
        acts.append(("connect", durable_attachments(durable)))
        return connect(target)

    monkeypatch.setattr(core.guests, "attach_device", attach_device)
    monkeypatch.setattr(core.connector, "connect", connect_volume)
    return acts


def test_a_shared_attach_is_durable_before_libvirt_is_asked(
    core: Core, acts_checked: list[tuple[str, set[str]]]
) -> None:
    first, second = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(first, multiattach=True))
    core.service.attach("a2", core.request(second, multiattach=True))
    assert acts_checked == [
        ("connect", {"a1"}),
        ("attach", {"a1"}),
        ("attach", {"a1", "a2"}),  # its own intent NORMAL, carried by the placement's
    ]


def test_an_intent_written_lightly_is_fsynced_before_a_connect_it_did_not_expect(
    core: Core, acts_checked: list[tuple[str, set[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection looked up before the intent was up; by the intent's
    # transaction it was gone (released in between), so the attach connects.
    first, second = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(first, multiattach=True))
    looked_up = core.store.get_connection(core.key)
    core.service.detach("a1")
    assert core.store.get_connection(core.key) is None
    answers = iter([looked_up])
    real = core.store.get_connection
    monkeypatch.setattr(core.store, "get_connection", lambda key: next(answers, None) or real(key))
    core.service.attach("a2", core.request(second, multiattach=True))
    assert acts_checked[-2:] == [("connect", {"a2"}), ("attach", {"a2"})]


# power cuts


def power_cut_keeps_intents_only(core: Core) -> Path:
    """From now on keep, beside the state file, a copy of it as of the last FULL
    commit: what a power cut leaves when every later NORMAL commit is lost
    (a FULL commit fsyncs the WAL, every earlier frame with it)."""
    durable = core.store.path.with_name("durable.sqlite3")

    def keep(sync: Sync) -> None:
        if sync is Sync.INTENT:
            # closed at once: the last connection to a WAL file checkpoints it
            with contextlib.closing(sqlite3.connect(durable)) as copy:
                core.store._db.backup(copy)

    keep(Sync.INTENT)
    core.store.on_commit = keep
    return durable


def reboot_after_power_cut(core: Core, durable: Path) -> Core:
    """The host loses power: running domains stop (transient ones are gone),
    the state file is its durable copy; the daemon starts in a new boot (its
    start-up reconcile is the caller's to run)."""
    core.store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{core.store.path}{suffix}").unlink(missing_ok=True)
    shutil.copy(durable, core.store.path)
    power_off(core.guests)
    return make_core(core.store.path.parent, core.guests, core.connector, boot_id="boot-b")


def power_off(guests: RecordingGuests) -> None:
    for domain in guests.list_domains():
        state = guests._domains[domain.uuid]
        if not domain.persistent:
            guests.vanish(domain)
        else:
            state.info, state.live = replace(domain, active=False), None


def test_a_power_cut_after_a_last_detach_answered_replays_the_same_answer(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    durable = power_cut_keeps_intents_only(core)
    answer = core.service.detach("a1")
    assert answer.terminate_connection
    after = reboot_after_power_cut(core, durable)
    assert after.store.get_tombstone("a1") is None, "the power cut lost the answer"
    after.reconciler.run()
    assert after.store.get_connection(after.key) is None, "released by reconcile"
    assert after.service.detach("a1") == answer, "the retry gets the answer given"
    after.store.close()


def test_a_power_cut_after_a_shared_detach_answered_replays_the_same_answer(
    core: Core,
) -> None:
    first, second = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(first, multiattach=True))
    core.service.attach("a2", core.request(second, multiattach=True))
    durable = power_cut_keeps_intents_only(core)
    answer = core.service.detach("a1")
    assert answer.host_refcount == 1 and not answer.terminate_connection
    after = reboot_after_power_cut(core, durable)
    assert after.store.get_tombstone("a1") is None, "the power cut lost the answer"
    after.reconciler.run()
    assert after.service.detach("a1") == answer
    assert after.service.detach("a2").terminate_connection, "the other is the last"
    after.store.close()


def test_a_power_cut_after_an_attach_answered_finishes_it(core: Core) -> None:
    guest = core.guests.define("g1")
    durable = power_cut_keeps_intents_only(core)
    attached, created = core.service.attach("a1", core.request(guest))
    assert created
    after = reboot_after_power_cut(core, durable)
    lost = after.store.get_attachment("a1")
    assert lost is not None and lost.state == "attaching", "the power cut lost 'attached'"
    after.reconciler.run()
    record = after.store.get_attachment("a1")
    assert record is not None and record.state == "attached", "reconcile finished it"
    again, created = after.service.attach("a1", after.request(guest))
    assert not created, "the retry finds it attached (200), as after any crash"
    assert again.model_dump(exclude={"device_path"}) == attached.model_dump(
        exclude={"device_path"}
    ), "the guest holds the disk the caller was told of"
    after.store.close()
