"""libvirt secret XML (``virSecretDefineXML``) as pure data: what a secret is
named and used for; its value never appears in XML."""

from __future__ import annotations

from dataclasses import dataclass, field

from hostagent.libvirt_xml.xmlmodel import XmlModel, attr, text

__all__ = ["SecretSpec"]


@dataclass(frozen=True)
class SecretSpec(XmlModel):
    """One ``<secret>``: its UUID, whether it lives only in memory (``ephemeral``)
    or can be read back through the API (``private``: no), and its usage."""

    XML_ROOT = "secret"

    ephemeral: str | None = field(default=None, metadata=attr("./@ephemeral"))
    private: str | None = field(default=None, metadata=attr("./@private"))
    uuid: str | None = field(default=None, metadata=text("./uuid"))
    usage_type: str | None = field(default=None, metadata=attr("./usage/@type"))
    # ceph, tls and vtpm usages are named by <name>; volume and iscsi ones are not modelled.
    usage_name: str | None = field(default=None, metadata=text("./usage/name"))
