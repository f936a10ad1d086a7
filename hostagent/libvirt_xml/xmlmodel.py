"""Declarative XML mapping: one xpath per dataclass field both reads and writes.

A model is a frozen dataclass inheriting ``XmlModel``; each mapped field carries
its xpath in ``dataclasses.field(metadata=attr("./driver/@cache"))``. Because the
same declaration drives ``to_element`` and ``from_element``, parse and format
cannot drift apart. Supported xpaths are the simple subset we can also *create*:
``./a/b[@k='v']/@attr`` -- child steps with optional ``[@k='v']`` / ``[@k]``
predicates, and a final ``@attr`` for attribute kinds.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Mapping
from typing import ClassVar, Self, TypeVar

from lxml import etree

__all__ = [
    "XmlModel",
    "XmlModelError",
    "attr",
    "child",
    "children",
    "flag",
    "from_element",
    "from_xml",
    "int_attr",
    "int_text",
    "parse_xml",
    "text",
    "to_element",
    "to_xml",
]

_METADATA_KEY = "hostagent.xmlmodel"


class XmlModelError(ValueError):
    """XML that does not fit a model (missing required value, bad int, wrong root)."""


class Kind(enum.Enum):
    """How a field's value is stored at its xpath."""

    ATTR = "attribute (str)"
    INT_ATTR = "attribute (int)"
    TEXT = "element text"
    INT_TEXT = "element text (int)"
    FLAG = "element presence (bool)"
    CHILD = "optional nested model"
    CHILDREN = "repeated nested model"


class XmlModel:
    """Base for frozen dataclasses mapped to one XML element named by ``XML_ROOT``.

    ``XML_ROOT`` is a single step such as ``"disk"`` or ``"address[@type='drive']"``.
    Its ``[@k='v']`` predicates are written wherever the model is (root or nested) and
    checked by ``from_element``; for nested models the field's xpath alone selects.
    """

    XML_ROOT: ClassVar[str]

    def to_element(self) -> etree._Element:
        """Format this model as a new element."""
        return to_element(self)

    def to_xml(self) -> str:
        """Format this model as pretty-printed XML text without a declaration."""
        return to_xml(self)

    @classmethod
    def from_element(cls, element: etree._Element) -> Self:
        """Parse an element; undeclared attributes and children are ignored."""
        return from_element(cls, element)

    @classmethod
    def from_xml(cls, xml: str | bytes) -> Self:
        """Parse XML text with the safe parser."""
        return from_element(cls, parse_xml(xml))


M = TypeVar("M", bound=XmlModel)


@dataclasses.dataclass(frozen=True)
class XmlField:
    """What a field's metadata declares: where its value lives and how."""

    xpath: str
    kind: Kind
    model: type[XmlModel] | None = None


def attr(xpath: str) -> Mapping[str, XmlField]:
    """A ``str`` attribute, e.g. ``./driver/@cache``."""
    return {_METADATA_KEY: XmlField(xpath, Kind.ATTR)}


def int_attr(xpath: str) -> Mapping[str, XmlField]:
    """An ``int`` attribute, e.g. ``./@unit``."""
    return {_METADATA_KEY: XmlField(xpath, Kind.INT_ATTR)}


def text(xpath: str) -> Mapping[str, XmlField]:
    """The text of an element, e.g. ``./serial``."""
    return {_METADATA_KEY: XmlField(xpath, Kind.TEXT)}


def int_text(xpath: str) -> Mapping[str, XmlField]:
    """The text of an element as an ``int``, e.g. ``./total_bytes_sec``."""
    return {_METADATA_KEY: XmlField(xpath, Kind.INT_TEXT)}


def flag(xpath: str) -> Mapping[str, XmlField]:
    """A ``bool`` that is True when the (empty) element exists, e.g. ``./shareable``."""
    return {_METADATA_KEY: XmlField(xpath, Kind.FLAG)}


def child(xpath: str, model: type[XmlModel]) -> Mapping[str, XmlField]:
    """An optional nested model (``Model | None``) at the element ``xpath`` names."""
    return {_METADATA_KEY: XmlField(xpath, Kind.CHILD, model)}


def children(xpath: str, model: type[XmlModel]) -> Mapping[str, XmlField]:
    """A ``tuple`` of nested models, one per element ``xpath`` matches."""
    return {_METADATA_KEY: XmlField(xpath, Kind.CHILDREN, model)}


# --- xpath subset: parsed once per field, used to create elements --------------------

_NAME = r"[A-Za-z_][\w.-]*"
_STEP_RE = re.compile(rf"(?P<tag>{_NAME})(?P<preds>(?:\[@{_NAME}(?:='[^']*')?\])*)")
_PRED_RE = re.compile(rf"\[@(?P<key>{_NAME})(?:='(?P<value>[^']*)')?\]")


@dataclasses.dataclass(frozen=True)
class _Step:
    """One element step: its tag and predicates (value None means 'attribute exists')."""

    tag: str
    predicates: tuple[tuple[str, str | None], ...]

    def matches(self, element: etree._Element) -> bool:
        if element.tag != self.tag:
            return False
        return all(
            element.get(key) is not None if value is None else element.get(key) == value
            for key, value in self.predicates
        )

    def create(self, parent: etree._Element | None) -> etree._Element:
        new = etree.Element(self.tag) if parent is None else etree.SubElement(parent, self.tag)
        for key, value in self.predicates:
            if value is not None:
                new.set(key, value)
        return new


def _parse_step(step: str) -> _Step:
    match = _STEP_RE.fullmatch(step)
    if match is None:
        raise XmlModelError(f"unsupported xpath step {step!r}")
    preds = tuple((p["key"], p["value"]) for p in _PRED_RE.finditer(match["preds"]))
    return _Step(match["tag"], preds)


@dataclasses.dataclass(frozen=True)
class _Binding:
    """A mapped field, ready to use: parsed path, compiled reader, value when absent."""

    name: str
    spec: XmlField
    steps: tuple[_Step, ...]
    attribute: str | None
    reader: etree.XPath
    nullable: bool
    default: object
    required: bool


def _parse_path(spec: XmlField) -> tuple[tuple[_Step, ...], str | None]:
    if not spec.xpath.startswith("./"):
        raise XmlModelError(f"xpath {spec.xpath!r} must be relative ('./...')")
    parts = spec.xpath[2:].split("/")
    attribute = parts.pop()[1:] if parts[-1].startswith("@") else None
    wants_attribute = spec.kind in (Kind.ATTR, Kind.INT_ATTR)
    if wants_attribute != (attribute is not None) or (not parts and attribute is None):
        raise XmlModelError(f"xpath {spec.xpath!r} does not fit a {spec.kind.value} field")
    return tuple(_parse_step(part) for part in parts), attribute


_BINDINGS: dict[type[XmlModel], tuple[_Binding, ...]] = {}


def _bindings(cls: type[XmlModel]) -> tuple[_Binding, ...]:
    """The mapped fields of ``cls``, worked out once per class."""
    if cls not in _BINDINGS:
        _BINDINGS[cls] = _compile_bindings(cls)
    return _BINDINGS[cls]


def _compile_bindings(cls: type[XmlModel]) -> tuple[_Binding, ...]:
    if not dataclasses.is_dataclass(cls):
        raise XmlModelError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    bindings = []
    for field in dataclasses.fields(cls):
        spec = field.metadata.get(_METADATA_KEY)
        if not isinstance(spec, XmlField):
            continue
        if (spec.kind in (Kind.CHILD, Kind.CHILDREN)) != (spec.model is not None):
            raise XmlModelError(f"{cls.__name__}.{field.name}: model given for the wrong kind")
        steps, attribute = _parse_path(spec)
        factory = field.default_factory
        default = factory() if factory is not dataclasses.MISSING else field.default
        bindings.append(
            _Binding(
                name=field.name,
                spec=spec,
                steps=steps,
                attribute=attribute,
                reader=etree.XPath(spec.xpath),
                nullable=types.NoneType in typing.get_args(hints[field.name]),
                default=default,
                required=default is dataclasses.MISSING,
            )
        )
    return tuple(bindings)


def _root_step(cls: type[XmlModel]) -> _Step:
    return _parse_step(cls.XML_ROOT)


# --- writing -------------------------------------------------------------------------


def _find_or_create(parent: etree._Element, steps: tuple[_Step, ...]) -> etree._Element:
    for step in steps:
        found = next((el for el in parent.iterchildren() if step.matches(el)), None)
        parent = step.create(parent) if found is None else found
    return parent


def _write(binding: _Binding, value: object, element: etree._Element) -> None:
    kind, steps = binding.spec.kind, binding.steps
    if value is None or value is False or value == ():
        return
    if kind is Kind.ATTR and isinstance(value, str) and binding.attribute:
        _find_or_create(element, steps).set(binding.attribute, value)
    elif kind is Kind.INT_ATTR and type(value) is int and binding.attribute:
        _find_or_create(element, steps).set(binding.attribute, str(value))
    elif kind is Kind.TEXT and isinstance(value, str):
        _find_or_create(element, steps).text = value
    elif kind is Kind.INT_TEXT and type(value) is int:
        _find_or_create(element, steps).text = str(value)
    elif kind is Kind.FLAG and value is True:
        _find_or_create(element, steps)
    elif kind is Kind.CHILD and isinstance(value, XmlModel):
        _write_fields(value, steps[-1].create(_find_or_create(element, steps[:-1])))
    elif kind is Kind.CHILDREN and isinstance(value, tuple):
        parent = _find_or_create(element, steps[:-1])
        for item in value:
            if not isinstance(item, XmlModel):
                raise XmlModelError(f"field {binding.name!r}: {item!r} is not a model")
            _write_fields(item, steps[-1].create(parent))
    else:
        raise XmlModelError(f"field {binding.name!r}: {value!r} is not a {kind.value}")


def _write_fields(model: XmlModel, element: etree._Element) -> None:
    # A nested model's identity attributes (XML_ROOT predicates) are written too.
    for key, value in _root_step(type(model)).predicates:
        if value is not None:
            element.set(key, value)
    for binding in _bindings(type(model)):
        _write(binding, getattr(model, binding.name), element)


def to_element(model: XmlModel) -> etree._Element:
    """Format ``model`` as a new element; None, False and () fields write nothing."""
    root = _root_step(type(model)).create(None)
    _write_fields(model, root)
    return root


def to_xml(model: XmlModel) -> str:
    """Format ``model`` as pretty-printed XML text without an XML declaration."""
    return etree.tostring(to_element(model), pretty_print=True, encoding="unicode")


# --- reading -------------------------------------------------------------------------


def _matches(binding: _Binding, element: etree._Element) -> list[object]:
    result = binding.reader(element)
    return list(result) if isinstance(result, list) else [result]


def _absent(binding: _Binding) -> object:
    if binding.spec.kind is Kind.FLAG:
        return False
    if binding.spec.kind is Kind.CHILDREN:
        return ()
    if binding.nullable:
        return None
    if binding.required:
        raise XmlModelError(f"required {binding.spec.xpath!r} is missing")
    return binding.default


def _read(binding: _Binding, element: etree._Element) -> object:
    found = _matches(binding, element)
    kind, model = binding.spec.kind, binding.spec.model
    if kind is Kind.CHILDREN and model is not None:
        return tuple(_read_fields(model, el) for el in found if isinstance(el, etree._Element))
    if not found:
        return _absent(binding)
    first = found[0]
    if kind in (Kind.ATTR, Kind.INT_ATTR):
        return _read_attribute(binding, str(first))
    if not isinstance(first, etree._Element):
        raise XmlModelError(f"{binding.spec.xpath!r} does not select an element")
    if kind is Kind.TEXT:
        return first.text or ""
    if kind is Kind.INT_TEXT:
        return _as_int(binding, first.text or "")
    if kind is Kind.CHILD and model is not None:
        return _read_fields(model, first)
    return True  # Kind.FLAG: the element exists


def _read_attribute(binding: _Binding, value: str) -> str | int:
    if binding.spec.kind is Kind.ATTR:
        return value
    return _as_int(binding, value)


def _as_int(binding: _Binding, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise XmlModelError(f"{binding.spec.xpath!r} is not an integer: {value!r}") from None


def _read_fields(cls: type[M], element: etree._Element) -> M:
    values = {binding.name: _read(binding, element) for binding in _bindings(cls)}
    return cls(**values)


def from_element(cls: type[M], element: etree._Element) -> M:
    """Parse ``element`` as ``cls``; its root must match ``cls.XML_ROOT``.

    An absent value reads as None if the field's type allows it, else as the field's
    default (flags False, lists ()); an absent required value is an ``XmlModelError``.
    """
    root = _root_step(cls)
    if not root.matches(element):
        raise XmlModelError(f"expected <{cls.XML_ROOT}>, got <{element.tag}>")
    return _read_fields(cls, element)


def from_xml(cls: type[M], xml: str | bytes) -> M:
    """Parse XML text as ``cls`` with the safe parser."""
    return from_element(cls, parse_xml(xml))


def parse_xml(xml: str | bytes) -> etree._Element:
    """Parse XML text without resolving entities or touching the network."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    data = xml.encode() if isinstance(xml, str) else xml
    return etree.fromstring(data, parser)
