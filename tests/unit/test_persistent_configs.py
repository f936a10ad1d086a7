"""guests/persistent_configs.py (and watched_disks.py, which it and live_disks.py
build on): a persistent config is read from libvirt
again after, and only after, libvirt wrote it (a real inotify watch on a
directory written the way libvirt saves configs)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostagent.errors import DomainNotFound
from hostagent.guests.domains import DomainInfo
from hostagent.guests.live_disks import status_dir_for
from hostagent.guests.persistent_configs import PersistentConfigs, config_dir_for
from hostagent.guests.watched_disks import KEEP_AT_MOST


class RecordingConfigReads:
    """Recording fake of libvirt's inactive-XML read: configs held in memory,
    each read recorded; ``during_read`` runs inside the next read."""

    def __init__(self) -> None:
        self.xml: dict[str, str] = {}
        self.reads: list[str] = []
        self.during_read: Callable[[], None] | None = None

    def __call__(self, domain_uuid: str) -> str:
        self.reads.append(domain_uuid)
        if domain_uuid not in self.xml:
            raise DomainNotFound(domain_uuid)
        xml = self.xml[domain_uuid]
        if self.during_read is not None:
            meanwhile, self.during_read = self.during_read, None
            meanwhile()
        return xml


def domain_xml(name: str, domain_uuid: str, *devices: str) -> str:
    disks = "".join(
        f"<disk type='block' device='disk'><source dev='{dev}'/><target dev='sd{i}'/></disk>"
        for i, dev in zip("abcdefgh", devices, strict=False)
    )
    head = f"<name>{name}</name><uuid>{domain_uuid}</uuid>"
    return f"<domain>{head}<devices>{disks}</devices></domain>"


class Libvirt:
    """Saves configs as libvirt's qemu driver does: beside, then renamed over.
    Also a recording fake of libvirt's two domain listings: ``every`` (all
    domains) and ``running`` (the running ones), each call recorded."""

    def __init__(self, config_dir: Path, reads: RecordingConfigReads) -> None:
        self.dir = config_dir
        self.reads = reads
        self.names: dict[str, str] = {}  # UUID -> name
        self.transient: set[str] = set()
        self.active: set[str] = set()
        self.listings: list[str] = []
        self.during_listing: Callable[[], None] | None = None

    def define(self, name: str, domain_uuid: str, *devices: str) -> None:
        xml = domain_xml(name, domain_uuid, *devices)
        self.reads.xml[domain_uuid] = xml
        self.names[domain_uuid] = name
        self.transient.discard(domain_uuid)
        staged = self.dir / f"{name}.xml.new"
        staged.write_text(xml)
        os.rename(staged, self.dir / f"{name}.xml")

    def undefine(self, name: str, domain_uuid: str) -> None:
        del self.reads.xml[domain_uuid]
        (self.dir / f"{name}.xml").unlink()
        if domain_uuid in self.active:
            self.transient.add(domain_uuid)  # running on, transient now
        else:
            del self.names[domain_uuid]

    def create(self, name: str, domain_uuid: str) -> None:
        """A transient domain: it runs, and has no file."""
        self.names[domain_uuid] = name
        self.transient.add(domain_uuid)
        self.active.add(domain_uuid)

    def every(self) -> list[DomainInfo]:
        self._listed("every")
        return sorted(
            (
                DomainInfo(
                    uuid=u, name=n, active=u in self.active, persistent=u not in self.transient
                )
                for u, n in self.names.items()
            ),
            key=lambda d: d.name,
        )

    def running(self) -> list[tuple[str, str]]:
        self._listed("running")
        return [(u, n) for u, n in self.names.items() if u in self.active]

    def _listed(self, which: str) -> None:
        self.listings.append(which)
        if self.during_listing is not None:
            meanwhile, self.during_listing = self.during_listing, None
            meanwhile()


@pytest.fixture
def reads() -> RecordingConfigReads:
    return RecordingConfigReads()


@pytest.fixture
def libvirt(tmp_path: Path, reads: RecordingConfigReads) -> Libvirt:
    config_dir = tmp_path / "qemu"
    config_dir.mkdir()
    return Libvirt(config_dir, reads)


@pytest.fixture
def configs(libvirt: Libvirt, reads: RecordingConfigReads) -> Iterator[PersistentConfigs]:
    cache = PersistentConfigs(reads, libvirt.dir)
    assert cache.caching
    yield cache
    cache.close()


def sources(configs: PersistentConfigs, name: str, domain_uuid: str) -> list[str | None]:
    return [disk.source_dev for disk in configs.disks_of(domain_uuid, name)]


def test_an_unchanged_config_is_read_once(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    u = str(uuid.uuid4())
    libvirt.define("g1", u, "/dev/loop7")
    assert sources(configs, "g1", u) == ["/dev/loop7"]
    assert sources(configs, "g1", u) == ["/dev/loop7"]
    assert reads.reads == [u]


def test_a_config_libvirt_saves_again_is_read_again(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    """``virsh attach-disk --config`` on a running domain sends no libvirt
    event: the file's rename is what says the cached config is old."""
    u, other = str(uuid.uuid4()), str(uuid.uuid4())
    libvirt.define("g1", u)
    libvirt.define("g2", other)
    assert sources(configs, "g1", u) == []
    assert sources(configs, "g2", other) == []
    libvirt.define("g1", u, "/dev/loop7")
    assert sources(configs, "g1", u) == ["/dev/loop7"]
    assert sources(configs, "g2", other) == []
    assert reads.reads == [u, other, u], "only the domain whose file changed is read again"


def test_a_change_drained_during_a_read_keeps_that_read_out_of_the_cache(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    """Another scan drains the change while this one is still reading the old
    config: what this one read must not be kept as current."""
    u, other = str(uuid.uuid4()), str(uuid.uuid4())
    libvirt.define("g1", u)
    libvirt.define("g2", other)
    sources(configs, "g2", other)

    def redefined_and_seen_elsewhere() -> None:
        libvirt.define("g1", u, "/dev/loop7")
        sources(configs, "g2", other)  # the other scan's drain

    reads.during_read = redefined_and_seen_elsewhere
    assert sources(configs, "g1", u) == [], "read before the change"
    assert sources(configs, "g1", u) == ["/dev/loop7"], "the old read was not kept"


def test_a_renamed_or_redefined_domain_is_read_again(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    u = str(uuid.uuid4())
    libvirt.define("g1", u, "/dev/loop7")
    sources(configs, "g1", u)
    libvirt.undefine("g1", u)
    libvirt.define("g1-new", u, "/dev/loop8")
    assert sources(configs, "g1-new", u) == ["/dev/loop8"]
    again = str(uuid.uuid4())  # undefined, then defined with another UUID
    libvirt.undefine("g1-new", u)
    libvirt.define("g1-new", again)
    assert sources(configs, "g1-new", again) == []
    with pytest.raises(DomainNotFound):
        configs.disks_of(u, "g1-new")


def test_a_domain_whose_file_is_not_there_is_read_every_time(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    """A directory that is not libvirt's (or a file naming another UUID) is
    never trusted: the cache only skips reads it can validate."""
    u = str(uuid.uuid4())
    reads.xml[u] = domain_xml("elsewhere", u, "/dev/loop7")
    (libvirt.dir / "impostor.xml").write_text(domain_xml("impostor", str(uuid.uuid4())))
    impostor = str(uuid.uuid4())
    reads.xml[impostor] = domain_xml("impostor", impostor)
    for _ in range(2):
        assert sources(configs, "elsewhere", u) == ["/dev/loop7"]
        configs.disks_of(impostor, "impostor")
    assert reads.reads == [u, impostor, u, impostor]


def test_without_its_directory_the_cache_reads_every_time(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    u = str(uuid.uuid4())
    libvirt.define("g1", u)
    sources(configs, "g1", u)
    libvirt.undefine("g1", u)
    reads.xml[u] = domain_xml("g1", u)
    libvirt.dir.rmdir()
    sources(configs, "g1", u)
    sources(configs, "g1", u)
    assert reads.reads == [u, u, u]
    assert not configs.caching


def test_forget_all_reads_everything_again(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    u = str(uuid.uuid4())
    libvirt.define("g1", u)
    sources(configs, "g1", u)
    configs.forget_all()  # libvirt reconnected
    sources(configs, "g1", u)
    assert reads.reads == [u, u]


def listed(configs: PersistentConfigs, libvirt: Libvirt) -> list[tuple[str, bool, bool]]:
    """(name, running, persistent) of every domain, as the cache lists them."""
    return [
        (d.name, d.active, d.persistent) for d in configs.domains(libvirt.every, libvirt.running)
    ]


def test_the_persistent_domains_are_listed_once_while_the_directory_is_unchanged(
    configs: PersistentConfigs, libvirt: Libvirt
) -> None:
    """Shut-off domains cost nothing after the first listing: only what runs
    now is asked for (a domain started, stopped or created transient makes
    no file change, and is seen by that ask)."""
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    libvirt.define("g1", first)
    libvirt.define("g2", second)
    assert listed(configs, libvirt) == [("g1", False, True), ("g2", False, True)]
    libvirt.active.add(second)  # started
    libvirt.create("t1", str(uuid.uuid4()))
    assert listed(configs, libvirt) == [
        ("g1", False, True),
        ("g2", True, True),
        ("t1", True, False),
    ]
    assert libvirt.listings == ["every", "running"]


def test_a_domain_defined_undefined_or_renamed_is_listed_again(
    configs: PersistentConfigs, libvirt: Libvirt
) -> None:
    kept, running = str(uuid.uuid4()), str(uuid.uuid4())
    libvirt.define("g1", kept)
    libvirt.define("g2", running)
    libvirt.active.add(running)
    listed(configs, libvirt)
    newcomer = str(uuid.uuid4())
    libvirt.define("g3", newcomer)
    assert ("g3", False, True) in listed(configs, libvirt)
    libvirt.undefine("g2", running)  # running on as a transient domain
    assert ("g2", True, False) in listed(configs, libvirt)
    libvirt.undefine("g1", kept)
    libvirt.define("g1-renamed", kept)
    assert [d[0] for d in listed(configs, libvirt)] == ["g1-renamed", "g2", "g3"]
    assert libvirt.listings == ["every", "every", "every", "every"]
    listed(configs, libvirt)
    assert libvirt.listings[-1] == "running", "kept again once the directory is quiet"


def test_a_domain_defined_during_a_listing_is_listed_by_the_next(
    configs: PersistentConfigs, libvirt: Libvirt
) -> None:
    """A definition that lands while the full listing is under way (libvirt may
    have answered before it) keeps that listing out of the cache; one that
    lands while the running ones are asked for sends the ask to a full one."""
    libvirt.define("g1", str(uuid.uuid4()))
    libvirt.during_listing = lambda: libvirt.define("g2", str(uuid.uuid4()))
    listed(configs, libvirt)
    assert [d[0] for d in listed(configs, libvirt)] == ["g1", "g2"]
    assert libvirt.listings == ["every", "every"]
    libvirt.during_listing = lambda: libvirt.define("g3", str(uuid.uuid4()))
    names = [d[0] for d in listed(configs, libvirt)]
    assert libvirt.listings[2:] == ["running", "every"]
    assert names == ["g1", "g2", "g3"]


def test_a_listing_with_a_domain_whose_file_is_not_there_is_never_kept(
    configs: PersistentConfigs, libvirt: Libvirt
) -> None:
    """A persistent domain without ``<name>.xml`` in the directory: the
    directory is not where libvirt saves, so its quiet says nothing."""
    libvirt.define("g1", str(uuid.uuid4()))
    elsewhere = str(uuid.uuid4())
    libvirt.names[elsewhere] = "elsewhere"
    for _ in range(2):
        assert [d[0] for d in listed(configs, libvirt)] == ["elsewhere", "g1"]
    assert libvirt.listings == ["every", "every"]


def test_forget_all_lists_everything_again(configs: PersistentConfigs, libvirt: Libvirt) -> None:
    libvirt.define("g1", str(uuid.uuid4()))
    listed(configs, libvirt)
    configs.forget_all()  # libvirt reconnected
    listed(configs, libvirt)
    assert libvirt.listings == ["every", "every"]


def test_without_a_directory_every_listing_is_libvirts(
    libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    libvirt.define("g1", str(uuid.uuid4()))
    uncached = PersistentConfigs(reads, None)
    listed(uncached, libvirt)
    listed(uncached, libvirt)
    assert libvirt.listings == ["every", "every"]


def test_an_empty_listing_is_never_kept(configs: PersistentConfigs, libvirt: Libvirt) -> None:
    """No persistent domain, no file: an empty directory may be anyone's."""
    libvirt.create("t1", str(uuid.uuid4()))
    listed(configs, libvirt)
    listed(configs, libvirt)
    assert libvirt.listings == ["every", "every"]


def test_a_config_libvirt_has_not_loaded_keeps_the_listing_from_being_kept(
    configs: PersistentConfigs, libvirt: Libvirt
) -> None:
    """A config dropped in by hand: libvirt defines it at its next reload,
    which writes no file. Until the listing has it, nothing is kept."""
    libvirt.define("g1", str(uuid.uuid4()))
    dropped = str(uuid.uuid4())
    (libvirt.dir / "g2.xml").write_text(domain_xml("g2", dropped))
    listed(configs, libvirt)
    listed(configs, libvirt)
    libvirt.names[dropped] = "g2"  # the reload: no file written
    assert [d[0] for d in listed(configs, libvirt)] == ["g1", "g2"]
    listed(configs, libvirt)
    assert libvirt.listings == ["every", "every", "every", "running"]


def test_a_file_naming_another_uuid_keeps_the_listing_from_being_kept(
    configs: PersistentConfigs, libvirt: Libvirt
) -> None:
    libvirt.define("g1", str(uuid.uuid4()))
    libvirt.define("g2", str(uuid.uuid4()))
    (libvirt.dir / "g2.xml").write_text(domain_xml("g2", str(uuid.uuid4())))
    listed(configs, libvirt)
    listed(configs, libvirt)
    assert libvirt.listings[-2:] == ["every", "every"]


def test_a_lifecycle_event_drops_the_kept_config_and_listing(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    """libvirt says a domain was defined (a reload may have written no file)."""
    u = str(uuid.uuid4())
    libvirt.define("g1", u, "/dev/loop7")
    sources(configs, "g1", u)
    listed(configs, libvirt)
    reads.xml[u] = domain_xml("g1", u)  # reloaded from a file edited in place earlier
    configs.changed(u)
    assert sources(configs, "g1", u) == []
    listed(configs, libvirt)
    assert reads.reads == [u, u]
    assert libvirt.listings == ["every", "every"]


def test_a_save_that_fails_after_creating_its_new_file_counts_as_a_change(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    """libvirt only logs a failed save: the file it wrote aside is removed and
    nothing is renamed, yet the domain changed in libvirt."""
    u = str(uuid.uuid4())
    libvirt.define("g1", u, "/dev/loop7")
    sources(configs, "g1", u)
    reads.xml[u] = domain_xml("g1", u)
    staged = libvirt.dir / "g1.xml.new"
    staged.write_text("<domain>")
    staged.unlink()
    assert sources(configs, "g1", u) == []


def test_nothing_is_kept_longer_than_the_most_it_may_be(
    libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    """A save that fails before its file is created makes no event at all."""
    now = [0.0]
    configs = PersistentConfigs(reads, libvirt.dir, monotonic=lambda: now[0])
    try:
        u = str(uuid.uuid4())
        libvirt.define("g1", u)
        sources(configs, "g1", u)
        listed(configs, libvirt)
        now[0] += KEEP_AT_MOST - 1
        sources(configs, "g1", u)
        listed(configs, libvirt)
        now[0] += 2
        sources(configs, "g1", u)
        listed(configs, libvirt)
        assert reads.reads == [u, u]
        assert libvirt.listings == ["every", "running", "every"]
    finally:
        configs.close()


def test_the_directory_is_the_system_instances_only_for_its_uri() -> None:
    assert config_dir_for("qemu:///system", "") == Path("/etc/libvirt/qemu")
    assert config_dir_for("qemu:///system?socket=/tmp/x/sock", "") is None
    assert config_dir_for("qemu+ssh://other/system", "") is None
    assert config_dir_for("qemu:///system", "none") is None
    assert config_dir_for("qemu+unix:///system?socket=/s", "/srv/qemu") == Path("/srv/qemu")


def test_a_fresh_read_asks_libvirt_and_keeps_its_answer(
    configs: PersistentConfigs, libvirt: Libvirt, reads: RecordingConfigReads
) -> None:
    """What the guard does with a kept live XML that shows its device: libvirt
    changed the domain and has not saved its file yet."""
    u = str(uuid.uuid4())
    libvirt.define("g1", u, "/dev/loop7")
    sources(configs, "g1", u)
    reads.xml[u] = domain_xml("g1", u)  # changed, the file not yet saved
    assert sources(configs, "g1", u) == ["/dev/loop7"], "kept"
    assert [d.source_dev for d in configs.disks_of(u, "g1", fresh=True)] == []
    assert sources(configs, "g1", u) == [], "the fresh answer is the one kept"
    assert reads.reads == [u, u]


def test_the_status_directory_is_the_system_instances_only_for_its_uri() -> None:
    assert status_dir_for("qemu:///system", "") == Path("/run/libvirt/qemu")
    assert status_dir_for("qemu:///session", "") is None
    assert status_dir_for("qemu:///system", "none") is None
    assert status_dir_for("qemu:///system?socket=/s", "/srv/run") == Path("/srv/run")
