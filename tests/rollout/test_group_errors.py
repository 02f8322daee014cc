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


def test_a_stopping_group_does_not_replace_dead_engines():
    """After SIGTERM (the driver sets `stopping`), an engine that dies is the job being ended:
    restart raises at once, naming it, instead of starting a replacement."""
    group = RolloutGroup.__new__(RolloutGroup)  # only restart's decision is under test
    group.restarts, group.max_restarts, group.stopping = [0, 0], 3, True
    group._start = lambda i: pytest.fail(f"engine {i} was started again")
    died = {1: ("died", "rollout engine 1 (rollout-1) died during generate: ActorUnavailableError: gone")}
    with pytest.raises(RolloutEngineError) as err:
        group.restart(died)
    assert err.value.engine_indices == [1]
    assert "rollout engine 1 (rollout-1) died during generate" in str(err.value)
    assert "not restarted: the job is being stopped" in str(err.value)
    assert group.restarts == [0, 0]
