"""The suite's split between two xdist workers (tests/conftest.py) names real files, keeps the
Slurm files together and each other file whole."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# by path: several conftest.py files exist and "import conftest" may find another one
_spec = importlib.util.spec_from_file_location("suite_conftest", REPO / "tests" / "conftest.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
FIRST, unit_of = _mod.FIRST, _mod.unit_of


def test_every_file_named_first_exists():
    # a renamed file would silently lose its early start and leave a long tail on one worker
    missing = [u for u in FIRST if not (REPO / u).exists()]
    assert not missing, missing


def test_slurm_files_share_one_unit_and_other_files_are_their_own():
    assert unit_of("tests/slurm/test_slurm_job.py::test_two_node_ray_cluster") == "tests/slurm"
    assert unit_of("tests/slurm/test_cispo_train_slurm.py::test_x[a::b]") == "tests/slurm"
    assert unit_of("tests/launch/test_loop_e2e.py::test_async_loop_runs_one_step_stale") == "tests/launch/test_loop_e2e.py"
    assert unit_of("tests/cispo/test_config.py::test_a[x-y]") != unit_of("tests/cispo/test_batch.py::test_b")
