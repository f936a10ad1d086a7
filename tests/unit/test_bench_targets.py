"""bench/attach_detach.py's summary: which targets of issue 11 a run measured,
the ratio each is judged by, and the order of quiet and loaded phases."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# bench/ holds scripts, not a package: its modules import as the scripts do
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import attach_detach
from attach_detach import Goal, Results, Samples


def samples(cycle_ms: float, count: int = 4, *, cpu_ms: float = 0.0) -> Samples:
    """``count`` cycles of ``cycle_ms`` (attach a third, detach the rest), one per second."""
    attach = cycle_ms / 3000
    return Samples(
        attach=[attach] * count,
        detach=[cycle_ms / 1000 - attach] * count,
        wall=float(count),
        daemon_cpu=cpu_ms / 1000 * count,
    )


def options(**given: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "parallel": 8,
        "storm": False,
        "proxy_floor": False,
        "defined": 0,
        "holders": 0,
        "fds_per_holder": 10_000,
        "busy_holders": False,
    }
    return argparse.Namespace(**{**defaults, **given})


def results() -> Results:
    found = Results(
        single=samples(115),
        shared=samples(105),
        single_raw=samples(100),
        loaded=samples(160),
        parallel=samples(300, cpu_ms=9),
        parallel_proxy=samples(280, cpu_ms=4),
    )
    found.storm = Samples(attach=[0.5] * 2, detach=[0.5] * 2, wall=2.0)  # 8 per second
    found.storm_raw = Samples(attach=[0.4] * 2, detach=[0.4] * 2, wall=1.6)  # 10 per second
    return found


def test_g1_and_g2_are_always_measured_the_rest_with_their_flags() -> None:
    assert [g.number for g in attach_detach.goals(results(), options())] == ["G1", "G2"]
    every = options(storm=True, proxy_floor=True, defined=200, holders=30_000)
    assert [g.number for g in attach_detach.goals(results(), every)] == [
        "G1",
        "G2",
        "G3",
        "G4",
        "G5",
    ]
    assert [g.number for g in attach_detach.goals(results(), options(holders=10))] == [
        "G1",
        "G2",
        "G3",
    ]


def test_each_target_is_its_ratio_within_the_run() -> None:
    every = options(storm=True, proxy_floor=True, defined=200, holders=30_000)
    found = {g.number: g for g in attach_detach.goals(results(), every)}
    assert round(found["G1"].measured, 2) == 1.05 and found["G1"].met  # shared / raw
    assert round(found["G2"].measured, 2) == 1.15 and found["G2"].met  # single / raw
    assert round(found["G3"].measured, 2) == 1.39 and not found["G3"].met  # loaded / single
    assert round(found["G4"].measured, 2) == 0.80 and not found["G4"].met  # 8 / 10 per s
    assert round(found["G5"].measured, 2) == 2.25 and not found["G5"].met  # 9 / 4 ms CPU


def test_g3_says_how_the_descriptors_were_held() -> None:
    few = options(defined=200, holders=30_000)
    many = options(defined=200, holders=30_000, fds_per_holder=100, busy_holders=True)
    g3 = {
        name: next(g for g in attach_detach.goals(results(), load) if g.number == "G3")
        for name, load in (("few", few), ("many", many))
    }
    assert "at most 10000 a process, idle" in g3["few"].what
    assert "at most 100 a process, busy" in g3["many"].what


def test_a_target_on_its_bound_is_met_either_way() -> None:
    assert Goal("G2", "x", 1.20, 1.20, at_most=True).met
    assert not Goal("G2", "x", 1.21, 1.20, at_most=True).met
    assert Goal("G4", "x", 0.85, 0.85, at_most=False).met
    assert not Goal("G4", "x", 0.84, 0.85, at_most=False).met


def test_the_summary_is_one_row_per_target() -> None:
    table = attach_detach.goal_table(
        [Goal("G1", "shared", 1.05, 1.10, at_most=True, detail="105.0 ms / 100.0 ms")]
    )
    assert "| # | what | measured | target | met |" in table
    assert "| G1 | shared | 1.05 (105.0 ms / 100.0 ms) | ≤ 1.10 | yes |" in table


def test_loaded_and_quiet_phases_take_turns_going_first() -> None:
    orders = [attach_detach.phase_order(n) for n in range(4)]
    assert orders == [(False, True), (True, False), (False, True), (True, False)]
