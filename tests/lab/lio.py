"""LIO targets for the lab scenarios, written once: fileio LUNs on iSCSI portals.

``lio_setup`` gives the shell lines a scenario runs inside the VM: make each
LUN's backing file, write one targetctl configuration and load it with
``lio_restore`` (tests/lab/scenario.sh). The configuration names the
initiator as ``$INITIATOR``, which the scenario sets from
``initiator_name`` before these lines run; nothing else in it is touched by
the shell (a CHAP password may hold ``$``, ``\\`` or a backtick).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

BACKING_DIR = "/var/lib/lab"
CONFIG = "/tmp/lio.json"
# Written into the configuration, replaced by the initiator's name in the VM.
INITIATOR_MARK = "@INITIATOR@"


@dataclass(frozen=True)
class LioLun:
    """One target with one LUN 0 on a fileio backstore, for one initiator."""

    iqn: str
    name: str  # the backstore's name, and its file's under BACKING_DIR
    size_mb: int = 64
    portals: tuple[str, ...] = ("127.0.0.1",)
    chap: tuple[str, str] | None = None  # (userid, password)

    def storage_object(self) -> dict[str, Any]:
        return {
            "plugin": "fileio",
            "name": self.name,
            "dev": f"{BACKING_DIR}/{self.name}.img",
            "size": self.size_mb * 1024 * 1024,
            "write_back": False,
        }

    def target(self) -> dict[str, Any]:
        acl: dict[str, Any] = {"node_wwn": INITIATOR_MARK}
        if self.chap is not None:
            acl["chap_userid"], acl["chap_password"] = self.chap
        acl["mapped_luns"] = [{"index": 0, "tpg_lun": 0, "write_protect": False}]
        tpg = {
            "tag": 1,
            "enable": True,
            "attributes": {"authentication": int(self.chap is not None), "generate_node_acls": 0},
            "portals": [{"ip_address": ip, "port": 3260} for ip in self.portals],
            "luns": [{"index": 0, "storage_object": f"/backstores/fileio/{self.name}"}],
            "node_acls": [acl],
        }
        return {"fabric": "iscsi", "wwn": self.iqn, "tpgs": [tpg]}


def lio_setup(*luns: LioLun, config: str = CONFIG) -> str:
    """Shell lines: backing files, the configuration (at ``config``), one ``lio_restore``."""
    text = json.dumps(
        {
            "storage_objects": [lun.storage_object() for lun in luns],
            "targets": [lun.target() for lun in luns],
        },
        indent=1,
    )
    if any(line.strip() == "EOF" for line in text.splitlines()):
        raise ValueError("the LIO configuration holds the here-document's end marker")
    lines = [f"mkdir -p {BACKING_DIR}"]
    lines += [f"truncate -s {lun.size_mb}M {BACKING_DIR}/{lun.name}.img" for lun in luns]
    # A quoted here-document: the shell expands nothing in the JSON; only the
    # initiator's mark is replaced afterwards.
    lines += [f"cat >{config} <<'EOF'", text, "EOF"]
    lines += [f'sed -i "s|{INITIATOR_MARK}|$INITIATOR|g" {config}', f"lio_restore {config}"]
    return "\n".join(lines) + "\n"
