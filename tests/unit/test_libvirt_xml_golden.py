"""Golden files for libvirt disk and secret XML: generate, parse, round-trip, RNG-validate.

Cases live in tests/data/xml/: ``build-*-in.json`` (a DiskRequest),
``spec-*-in.json`` (DiskSpec fields) and ``secret-*-in.json`` (SecretSpec
fields) against ``*-out.xml``; ``parse-*-in.xml`` (domain XML from libvirt)
against ``*-out.json``. To rewrite the outputs after an intended change, run
with HOSTAGENT_REGEN_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hostagent.libvirt_xml.disk import (
    ControllerSpec,
    DiskSpec,
    DomainDevices,
    DriveAddress,
    IoTune,
    SourceHost,
    parse_domain,
)
from hostagent.libvirt_xml.policy import BlockSource, DiskRequest, NetworkSource, build_disk
from hostagent.libvirt_xml.secret import SecretSpec

DATA = Path(__file__).resolve().parent.parent / "data" / "xml"
REGENERATE = os.environ.get("HOSTAGENT_REGEN_GOLDEN") == "1"
DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")
SECRET_RNG = Path("/usr/share/libvirt/schemas/secret.rng")
MAPPED_MODELS = (
    DiskSpec,
    DriveAddress,
    SourceHost,
    IoTune,
    ControllerSpec,
    DomainDevices,
    SecretSpec,
)


def case_names(prefix: str, suffix: str) -> list[str]:
    return sorted(p.name.removesuffix(suffix) for p in DATA.glob(f"{prefix}*{suffix}"))


BUILD_CASES = case_names("build-", "-in.json")
SPEC_CASES = case_names("spec-", "-in.json")
PARSE_CASES = case_names("parse-", "-in.xml")
SECRET_CASES = case_names("secret-", "-in.json")
DISK_CASES = BUILD_CASES + SPEC_CASES


# --- reading the JSON inputs ----------------------------------------------------------


def address_from_json(data: dict[str, int] | None) -> DriveAddress | None:
    return None if data is None else DriveAddress(**data)


def hosts_from_json(data: list[dict[str, Any]]) -> tuple[SourceHost, ...]:
    return tuple(SourceHost(**host) for host in data)


def iotune_from_json(data: dict[str, int] | None) -> IoTune | None:
    return None if data is None else IoTune(**data)


def request_from_json(data: dict[str, Any]) -> DiskRequest:
    (kind, source), *_ = data.pop("source").items()
    if kind == "block":
        source_value: BlockSource | NetworkSource = BlockSource(**source)
    else:
        source_value = NetworkSource(**(source | {"hosts": hosts_from_json(source["hosts"])}))
    address = address_from_json(data.pop("address"))
    iotune = iotune_from_json(data.pop("iotune", None))
    return DiskRequest(source=source_value, address=address, iotune=iotune, **data)


def spec_from_json(data: dict[str, Any]) -> DiskSpec:
    data["address"] = address_from_json(data.get("address"))
    data["source_hosts"] = hosts_from_json(data.get("source_hosts", []))
    data["iotune"] = iotune_from_json(data.get("iotune"))
    return DiskSpec(**data)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def disk_for_case(case: str) -> DiskSpec:
    """The DiskSpec a build-/spec- case describes."""
    data = load_json(DATA / f"{case}-in.json")
    if case.startswith("build-"):
        return build_disk(request_from_json(data))
    return spec_from_json(data)


def secret_for_case(case: str) -> SecretSpec:
    return SecretSpec(**load_json(DATA / f"{case}-in.json"))


def domain_for_case(case: str) -> DomainDevices:
    return parse_domain((DATA / f"{case}-in.xml").read_bytes())


def as_json(devices: DomainDevices) -> str:
    return json.dumps(dataclasses.asdict(devices), indent=2) + "\n"


# --- comparing with goldens -----------------------------------------------------------


def pretty_xml(text: str) -> str:
    """Indentation-independent form of an XML document, for a readable string diff."""
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    root = etree.fromstring(text.encode(), parser)
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def pretty_json(text: str) -> str:
    return json.dumps(json.loads(text), indent=2, sort_keys=True)


def assert_golden(path: Path, actual: str, normalise: Callable[[str], str]) -> None:
    if REGENERATE:
        path.write_text(actual)
    assert path.exists(), f"{path.name} missing: run with HOSTAGENT_REGEN_GOLDEN=1"
    assert normalise(actual) == normalise(path.read_text())


@pytest.mark.parametrize("case", DISK_CASES)
def test_disk_xml_matches_golden(case: str) -> None:
    assert_golden(DATA / f"{case}-out.xml", disk_for_case(case).to_xml(), pretty_xml)


@pytest.mark.parametrize("case", SECRET_CASES)
def test_secret_xml_matches_golden(case: str) -> None:
    assert_golden(DATA / f"{case}-out.xml", secret_for_case(case).to_xml(), pretty_xml)


@pytest.mark.parametrize("case", PARSE_CASES)
def test_parsed_domain_matches_golden(case: str) -> None:
    assert_golden(DATA / f"{case}-out.json", as_json(domain_for_case(case)), pretty_json)


def test_golden_cases_exist() -> None:
    assert len(BUILD_CASES) >= 4
    assert len(SPEC_CASES) >= 1
    assert len(PARSE_CASES) >= 2
    assert len(SECRET_CASES) >= 1
    outputs = {p.name for p in DATA.glob("*-out.*")}
    expected = {f"{c}-out.xml" for c in DISK_CASES + SECRET_CASES} | {
        f"{c}-out.json" for c in PARSE_CASES
    }
    assert outputs == expected, "every -in file needs exactly one -out file"


# --- round trip -----------------------------------------------------------------------


@pytest.mark.parametrize("case", DISK_CASES)
def test_golden_disk_round_trips(case: str) -> None:
    spec = disk_for_case(case)
    assert DiskSpec.from_element(spec.to_element()) == spec
    assert DiskSpec.from_xml(spec.to_xml()) == spec


@pytest.mark.parametrize("case", SECRET_CASES)
def test_golden_secret_round_trips(case: str) -> None:
    secret = secret_for_case(case)
    assert SecretSpec.from_element(secret.to_element()) == secret
    assert SecretSpec.from_xml(secret.to_xml()) == secret


@pytest.mark.parametrize("case", PARSE_CASES)
def test_parsed_devices_round_trip(case: str) -> None:
    devices = domain_for_case(case)
    for disk in devices.disks:
        assert DiskSpec.from_element(disk.to_element()) == disk
    for controller in devices.controllers:
        assert ControllerSpec.from_element(controller.to_element()) == controller
    assert DomainDevices.from_element(devices.to_element()) == devices


# --- every mapped field is exercised by some golden ------------------------------------


def walk(objects: Iterable[object]) -> Iterator[object]:
    """Every dataclass instance in ``objects``, nested ones and tuple items included."""
    for obj in objects:
        if isinstance(obj, tuple):
            yield from walk(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            yield obj
            yield from walk(getattr(obj, f.name) for f in dataclasses.fields(obj))


def unexercised_fields(instances: Iterable[object]) -> list[str]:
    """Fields never given a non-default value; required fields need two distinct values,
    so a mapping that always reads the same (or a swapped) attribute cannot pass."""
    seen: dict[tuple[type, str], set[object]] = defaultdict(set)
    for obj in walk(instances):
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            seen[type(obj), f.name].add(getattr(obj, f.name))
    missing = []
    for model in MAPPED_MODELS:
        for f in dataclasses.fields(model):
            values = seen[model, f.name]
            if f.default is dataclasses.MISSING:
                exercised = len(values) >= 2
            else:
                exercised = any(value != f.default for value in values)
            if not exercised:
                missing.append(f"{model.__name__}.{f.name}")
    return missing


def all_golden_instances() -> list[object]:
    return (
        [disk_for_case(c) for c in DISK_CASES]
        + [domain_for_case(c) for c in PARSE_CASES]
        + [secret_for_case(c) for c in SECRET_CASES]
    )


def test_every_mapped_field_is_exercised_by_goldens() -> None:
    assert unexercised_fields(all_golden_instances()) == []


def test_exercise_check_reports_what_is_missing() -> None:
    only_virtio = [disk_for_case("build-block-ro-virtio")]
    missing = unexercised_fields(only_virtio)
    assert "DiskSpec.shareable" in missing
    assert "DriveAddress.unit" in missing
    assert "DiskSpec.readonly" not in missing


# --- libvirt's RelaxNG schema ---------------------------------------------------------


@pytest.fixture(scope="session")
def domain_rng() -> etree.RelaxNG:
    if not DOMAIN_RNG.exists():
        pytest.skip(f"{DOMAIN_RNG} not installed (package libvirt-daemon-common)")
    return etree.RelaxNG(file=str(DOMAIN_RNG))


@pytest.fixture(scope="session")
def secret_rng() -> etree.RelaxNG:
    if not SECRET_RNG.exists():
        pytest.skip(f"{SECRET_RNG} not installed (package libvirt-daemon-common)")
    return etree.RelaxNG(file=str(SECRET_RNG))


def minimal_domain(disk: etree._Element) -> etree._Element:
    """The smallest domain libvirt's schema accepts, holding ``disk``."""
    domain = etree.fromstring(
        "<domain type='kvm'><name>x</name><memory>65536</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices/></domain>"
    )
    devices = domain.find("devices")
    assert devices is not None
    devices.append(disk)
    return domain


def assert_valid_disk(rng: etree.RelaxNG, disk: DiskSpec) -> None:
    domain = minimal_domain(disk.to_element())
    valid = rng.validate(domain)
    xml = etree.tostring(domain, pretty_print=True, encoding="unicode")
    assert valid, f"libvirt RNG rejects:\n{xml}\n{rng.error_log}"


@pytest.mark.parametrize("case", DISK_CASES)
def test_golden_disk_is_valid_for_libvirt(domain_rng: etree.RelaxNG, case: str) -> None:
    assert_valid_disk(domain_rng, disk_for_case(case))


@pytest.mark.parametrize("case", PARSE_CASES)
def test_reformatted_parsed_disks_are_valid(domain_rng: etree.RelaxNG, case: str) -> None:
    for disk in domain_for_case(case).disks:
        assert_valid_disk(domain_rng, disk)


@pytest.mark.parametrize("case", SECRET_CASES)
def test_golden_secret_is_valid_for_libvirt(secret_rng: etree.RelaxNG, case: str) -> None:
    secret = secret_for_case(case).to_element()
    xml = etree.tostring(secret, pretty_print=True, encoding="unicode")
    assert secret_rng.validate(secret), f"libvirt RNG rejects:\n{xml}\n{secret_rng.error_log}"


def test_secret_rng_check_rejects_what_libvirt_would(secret_rng: etree.RelaxNG) -> None:
    """The harness can fail: ceph usage needs a name, and private is yes or no."""
    for bad in (SecretSpec(usage_type="ceph"), SecretSpec(private="true")):
        assert not secret_rng.validate(bad.to_element())


def valid_requests() -> Iterator[DiskRequest]:
    """Every combination the rules accept, on both kinds of source."""
    sources: tuple[BlockSource | NetworkSource, ...] = (
        BlockSource("/dev/dm-3"),
        NetworkSource("rbd", "volumes/v1", (SourceHost("10.0.0.1", "6789"),)),
        NetworkSource(
            "rbd", "volumes/v2", (), "cinder", "ceph", "1b2f0f0e-5d0c-4c2a-9d2e-7f1f3b9e2a11"
        ),
    )
    combos = itertools.product(sources, (True, False), ("rw", "ro"), ("scsi", "virtio"))
    for (source, multiattach, mode, bus), disk_format in itertools.product(
        combos, ("raw", "qcow2")
    ):
        if multiattach and disk_format != "raw":
            continue
        yield DiskRequest(
            attachment_id="a-1",
            serial="s-1",
            source=source,
            multiattach=multiattach,
            mode=mode,
            bus=bus,
            disk_format=disk_format,
            target_dev="sdb" if bus == "scsi" else "vdb",
            address=DriveAddress(0, 0, 0, 1) if bus == "scsi" else None,
        )


def test_every_accepted_request_is_valid_for_libvirt(domain_rng: etree.RelaxNG) -> None:
    requests = list(valid_requests())
    assert len(requests) == 36
    for request in requests:
        assert_valid_disk(domain_rng, build_disk(request))


def test_rng_check_rejects_what_libvirt_would(domain_rng: etree.RelaxNG) -> None:
    """The harness can fail: a serial with '/' and an unknown device are outside the schema."""
    for bad in (
        DiskSpec(disk_type="block", source_dev="/dev/sdb", target_dev="sdb", serial="a/b"),
        DiskSpec(disk_type="block", device="tape", source_dev="/dev/sdb", target_dev="sdb"),
    ):
        assert not domain_rng.validate(minimal_domain(bad.to_element()))
