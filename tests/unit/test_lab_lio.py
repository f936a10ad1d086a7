"""The lab's LIO setup lines hand targetctl exactly the configuration declared:
the shell replaces the initiator's name and touches nothing else."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.lab.lio import LioLun, lio_setup

PASSWORD = r"pa$$w`rd\n\t$(id)'\"x"


def test_the_shell_changes_nothing_but_the_initiator(tmp_path: Path) -> None:
    config = tmp_path / "lio.json"
    lines = lio_setup(
        LioLun("iqn.2026-11.lab:t1", "t1", chap=("user1", PASSWORD)), config=str(config)
    )
    stubs = "mkdir() { :; }\ntruncate() { :; }\nlio_restore() { :; }\n"
    initiator = "iqn.1993-08.org.debian:01:abc123"
    subprocess.run(
        ["bash", "-euc", stubs + f"INITIATOR={initiator}\n" + lines],
        check=True,
        capture_output=True,
        text=True,
    )
    [target] = json.loads(config.read_text())["targets"]
    [acl] = target["tpgs"][0]["node_acls"]
    assert acl["node_wwn"] == initiator
    assert (acl["chap_userid"], acl["chap_password"]) == ("user1", PASSWORD)
