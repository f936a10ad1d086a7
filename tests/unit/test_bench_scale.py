"""bench/scale.py's plan: both sizes fit together and no domain gets a volume twice."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

# bench/ is a directory of scripts, not a package: load the file itself (an
# import of bench.scale would make mypy see it under two module names).
_PATH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
_SPEC = importlib.util.spec_from_file_location("bench_scale", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
scale = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_scale"] = scale  # dataclasses look their module up by name
_SPEC.loader.exec_module(scale)
make_plan, row, running_domains, spread = (
    scale.make_plan,
    scale.row,
    scale.running_domains,
    scale.spread,
)


def test_the_default_sizes_spread_evenly_with_no_volume_twice_on_a_domain() -> None:
    placements = spread(400, 200, 20)
    assert len({(p.domain, p.volume) for p in placements}) == 400
    assert len({p.attachment_id for p in placements}) == 400
    assert set(Counter(p.domain for p in placements).values()) == {2}
    assert set(Counter(p.volume for p in placements).values()) == {20}


def test_the_small_size_is_the_first_part_of_the_large_one() -> None:
    plan = make_plan(400, 200, 50, 20, 8)
    assert plan.small_domains == 25
    assert len(plan.small) == 50
    assert {p.domain for p in plan.small} == set(range(25))
    assert len(plan.growth) == 350
    assert {p.domain for p in plan.growth} == set(range(25, 200))


def test_the_running_share_is_kept_in_both_sizes() -> None:
    small, large = running_domains(8, 25, 200)
    assert small == {0}
    assert len(large) == 8
    assert small <= large
    assert running_domains(0, 25, 200) == (set(), set())


def test_sizes_that_cannot_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="one volume twice"):
        spread(400, 10, 20)
    with pytest.raises(ValueError, match="volumes must be at least 1"):
        make_plan(400, 200, 50, 0, 8)


def test_a_row_says_whether_the_target_is_met() -> None:
    assert row("G6", "reconcile", 1.5, 2.0, "s").endswith("| yes |")
    assert row("G8", "VmRSS", 80.01, 80.0, "MB").endswith("| NO |")
