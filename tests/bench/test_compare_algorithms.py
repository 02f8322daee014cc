"""bench/compare_algorithms.py's bookkeeping: which runs a row makes, how runs cut short by a
deadline are compared, and when a curve reaches the reference level."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cmp():
    spec = importlib.util.spec_from_file_location("compare_algorithms", REPO / "bench" / "compare_algorithms.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_row_on_every_seed_or_the_named_ones(cmp):
    assert cmp.parse_row("dapo:algorithm=dapo trainer.lr=1e-4", [0, 1, 2]) == (
        "dapo", [0, 1, 2], ["algorithm=dapo", "trainer.lr=1e-4"])
    assert cmp.parse_row("bf16@0,2:algorithm=cispo", [0, 1, 2]) == ("bf16", [0, 2], ["algorithm=cispo"])
    with pytest.raises(SystemExit, match=r"seeds \[5\] are not in --seeds"):
        cmp.parse_row("bf16@5:algorithm=cispo", [0, 1, 2])


def test_runs_cut_short_are_compared_over_the_common_steps(cmp):
    runs = [{"steps": 9, "curves": {"reward/mean": list(range(9))}},
            {"steps": 12, "curves": {"reward/mean": list(range(12))}},
            {"steps": 0, "curves": {"reward/mean": []}}]  # a run that made no step does not cut the others to 0
    assert cmp.truncate(runs) == 9
    assert [len(r["curves"]["reward/mean"]) for r in runs] == [9, 9, 0]


def test_steps_to_reach_uses_the_moving_average(cmp):
    curve = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # 5-step means: 0.2 at step 5, 0.6 at step 7, 1.0 at step 9
    assert cmp.steps_to_reach(curve, 0.6) == 7
    assert cmp.steps_to_reach(curve, 1.0) == 9
    assert cmp.steps_to_reach(curve, 1.01) is None
