"""The declarative engine (xmlmodel) on a toy model that uses every field kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree

from hostagent.libvirt_xml import xmlmodel
from hostagent.libvirt_xml.disk import DiskSpec, DriveAddress
from hostagent.libvirt_xml.xmlmodel import (
    XmlModel,
    XmlModelError,
    attr,
    child,
    children,
    flag,
    int_attr,
    text,
)


@dataclass(frozen=True)
class Leaf(XmlModel):
    XML_ROOT = "leaf[@kind='green']"

    size: int = field(metadata=int_attr("./@size"))
    note: str | None = field(default=None, metadata=attr("./@note"))


@dataclass(frozen=True)
class Toy(XmlModel):
    XML_ROOT = "toy"

    name: str = field(metadata=attr("./@name"))
    colour: str = field(default="red", metadata=attr("./paint/@colour"))
    label: str | None = field(default=None, metadata=text("./label"))
    shiny: bool = field(default=False, metadata=flag("./shiny"))
    gloss: str | None = field(default=None, metadata=attr("./paint/@gloss"))
    main_leaf: Leaf | None = field(default=None, metadata=child("./leaf[@kind='green']", Leaf))
    leaves: tuple[Leaf, ...] = field(default=(), metadata=children("./branch/leaf", Leaf))


FULL = Toy(
    name="t1",
    colour="blue",
    label="hello",
    shiny=True,
    gloss="matte",
    main_leaf=Leaf(size=3),
    leaves=(Leaf(size=1, note="a"), Leaf(size=2)),
)


def test_writes_every_kind_in_declaration_order() -> None:
    assert FULL.to_xml() == (
        '<toy name="t1">\n'
        '  <paint colour="blue" gloss="matte"/>\n'
        "  <label>hello</label>\n"
        "  <shiny/>\n"
        '  <leaf kind="green" size="3"/>\n'
        "  <branch>\n"
        '    <leaf kind="green" size="1" note="a"/>\n'
        '    <leaf kind="green" size="2"/>\n'
        "  </branch>\n"
        "</toy>\n"
    )


def test_round_trips() -> None:
    assert Toy.from_element(FULL.to_element()) == FULL
    assert Toy.from_xml(FULL.to_xml()) == FULL
    assert xmlmodel.from_xml(Toy, xmlmodel.to_xml(FULL)) == FULL


def test_none_false_and_empty_write_nothing() -> None:
    bare = Toy(name="t", colour="red")
    assert bare.to_xml() == '<toy name="t">\n  <paint colour="red"/>\n</toy>\n'


def test_missing_values_read_as_none_or_default() -> None:
    """Nullable fields read None, others their dataclass default; flags False, lists ()."""
    assert Toy.from_xml("<toy name='t'/>") == Toy(name="t", colour="red")


def test_undeclared_xml_is_ignored() -> None:
    xml = (
        "<toy name='t' extra='1'><!-- c --><paint colour='x' other='y'><deep/></paint>"
        "<unknown/><label>l</label><leaf kind='green' size='4' x='1'><y/></leaf></toy>"
    )
    assert Toy.from_xml(xml) == Toy(name="t", colour="x", label="l", main_leaf=Leaf(size=4))


def test_child_predicate_selects_only_matching_elements() -> None:
    xml = "<toy name='t'><leaf kind='brown' size='9'/><branch><leaf size='1'/></branch></toy>"
    assert Toy.from_xml(xml).main_leaf is None
    # The children xpath has no predicate, so any <leaf> under <branch> counts.
    assert Toy.from_xml(xml).leaves == (Leaf(size=1),)


def test_empty_element_text_reads_as_empty_string() -> None:
    assert Toy.from_xml("<toy name='t'><label/></toy>").label == ""
    assert Toy.from_xml(Toy(name="t", label="").to_xml()).label == ""


def test_missing_required_value_is_an_error() -> None:
    with pytest.raises(XmlModelError, match="@name"):
        Toy.from_xml("<toy/>")


def test_bad_integer_is_an_error() -> None:
    with pytest.raises(XmlModelError, match="not an integer"):
        Toy.from_xml("<toy name='t'><leaf kind='green' size='big'/></toy>")


def test_root_must_match_including_predicates() -> None:
    with pytest.raises(XmlModelError, match="expected <toy>"):
        Toy.from_xml("<other name='t'/>")
    with pytest.raises(XmlModelError, match="leaf"):
        Leaf.from_xml("<leaf kind='brown' size='1'/>")
    assert Leaf.from_xml("<leaf kind='green' size='1'/>") == Leaf(size=1)
    with pytest.raises(XmlModelError):
        DriveAddress.from_xml("<address type='pci' controller='0' bus='0' target='0' unit='0'/>")


def test_wrong_value_type_is_an_error() -> None:
    with pytest.raises(XmlModelError, match="colour"):
        Toy(name="t", colour=3).to_xml()  # type: ignore[arg-type]
    with pytest.raises(XmlModelError, match="size"):
        Leaf(size="3").to_xml()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        (attr("./label"), "does not fit"),
        (text("./label/@x"), "does not fit"),
        (flag("./"), "unsupported"),
        (attr("label/@x"), "relative"),
        (attr("./a[position()=1]/@x"), "unsupported"),
    ],
)
def test_misdeclared_xpath_is_refused(
    declaration: dict[str, xmlmodel.XmlField], message: str
) -> None:
    @dataclass(frozen=True)
    class Broken(XmlModel):
        XML_ROOT = "broken"
        value: str | None = field(default=None, metadata=declaration)

    with pytest.raises(XmlModelError, match=message):
        Broken(value="v").to_xml()


def test_to_xml_has_no_declaration() -> None:
    assert not FULL.to_xml().startswith("<?xml")


def test_parser_does_not_resolve_external_entities(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xml = (
        f'<!DOCTYPE disk [<!ENTITY xxe SYSTEM "file://{secret}">]>'
        "<disk type='block'><serial>&xxe;</serial><target dev='sda'/></disk>"
    )
    disk = DiskSpec.from_xml(xml)
    assert "TOP-SECRET" not in repr(disk)
    assert disk.target_dev == "sda"


def test_parser_accepts_bytes_with_declaration() -> None:
    xml = b"<?xml version='1.0' encoding='UTF-8'?><toy name='t'/>"
    assert Toy.from_xml(xml) == Toy(name="t")
    assert isinstance(xmlmodel.parse_xml(xml), etree._Element)
