"""failpoints: parsed once from the environment, refusing unknown names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hostagent import failpoints


def test_specs_name_a_point_and_optionally_the_pass_that_kills() -> None:
    assert failpoints._parse("") == {}
    assert failpoints._parse("attach.after_libvirt") == {"attach.after_libvirt": 1}
    assert failpoints._parse(" detach.after_removal:3 , attach.after_intent") == {
        "detach.after_removal": 3,
        "attach.after_intent": 1,
    }
    for bad in ("attach.nowhere", "attach.after_libvirt:x"):
        with pytest.raises(SystemExit, match="bad failpoint"):
            failpoints._parse(bad)


def test_production_has_none_and_hit_is_a_no_op() -> None:
    assert failpoints._ENABLED == {}
    for point in failpoints.POINTS:
        failpoints.hit(point)


def test_an_enabled_point_kills_the_process_on_its_pass() -> None:
    code = (
        "from hostagent import failpoints\n"
        "failpoints.hit('attach.after_intent')\n"
        "print('first pass survived', flush=True)\n"
        "failpoints.hit('attach.after_intent')\n"
        "print('second pass survived', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"HOSTAGENT_FAILPOINTS": "attach.after_intent:2", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == -9
    assert done.stdout == "first pass survived\n"
