"""A rollout engine that cannot start says why on the console, not only in its log."""

import pytest

ray = pytest.importorskip("ray")

from rollout.group import RolloutEngineError, RolloutGroup, root_cause  # noqa: E402


def test_root_cause_is_the_last_error_line_of_the_traceback():
    message = ("The actor died because of an error raised in its creation task, ray::rollout-0:RolloutEngine.__init__()\n"
               "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
               "RuntimeError: first\n  ...\nValueError: Available memory on node 0 (3.65/23.54 GiB) is too low\n")
    assert root_cause(message) == "ValueError: Available memory on node 0 (3.65/23.54 GiB) is too low"
    assert root_cause("The actor died unexpectedly before finishing this task.") == (
        "The actor died unexpectedly before finishing this task.")


def test_engine_failing_at_start_up_names_the_cause():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Broken:
            def __init__(self):
                raise ValueError("Available memory on node 0 is less than desired CPU memory utilization")

            def info(self):
                return {}

        group = RolloutGroup.__new__(RolloutGroup)  # only its bounded wait is under test
        group.names, group.timeout_s = ["rollout-0"], 60.0
        with pytest.raises(RolloutEngineError) as err:
            group.wait([Broken.remote().info.remote()], "start-up")
        assert "rollout engine 0 (rollout-0) died during start-up" in str(err.value)
        assert "ValueError: Available memory on node 0 is less than desired" in str(err.value)
    finally:
        if started:
            ray.shutdown()
