"""How the suite is shared between two pytest-xdist workers (`-n 2`, the README's test command).

Most of the suite's wall time is end-to-end runs waiting on process start-up (Ray, vLLM,
DeepSpeed) more than computing, so two workers on a 2-core machine overlap that waiting.
Each test file stays on one worker (its module-scoped fixtures start a system once), the
Slurm files share one worker (the session's one local Slurm), and the longest files go out
first so that neither worker is left alone with a long tail.
"""

from __future__ import annotations

import pytest

from launch.cluster import no_idle_workers

# The Ray clusters the tests start themselves prestart no idle workers either (the test
# processes' raylets inherit it): fewer processes on two cores, and none that is not ours
# in the output the abort checks read.
no_idle_workers()

# Longest first (seconds, serial run on the 2-core CI machine, 2026-12-01): launch/test_loop_e2e
# ~400, the Slurm files ~290, launch/test_first_day ~135, launch/test_engine_recovery ~110.
FIRST = ["tests/launch/test_loop_e2e.py", "tests/slurm", "tests/launch/test_first_day.py",
         "tests/launch/test_engine_recovery.py", "tests/launch/test_reasoning_recipe.py",
         "tests/launch/test_bad_input.py", "tests/rollout/test_rollout_ray.py", "tests/launch/test_minimax_loop.py",
         "tests/trainer/test_clean_exit.py"]


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or all Slurm files together."""
    path = nodeid.split("::", 1)[0]
    return "tests/slurm" if path.startswith("tests/slurm/") else path


def _rank(item: pytest.Item) -> int:
    unit = unit_of(item.nodeid)
    return FIRST.index(unit) if unit in FIRST else len(FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)  # stable: files keep their order, and tests their order within a file


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: a plain `pytest` run without it still works
def pytest_xdist_make_scheduler(config, log):
    # A scheduler of our own rather than `--dist loadgroup`: xdist 3.8 groups by rewriting
    # item._nodeid, which pytest 9.2 no longer reads, so xdist_group marks were ignored.
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # keep the order above, not the test count's

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByFile(config, log)
