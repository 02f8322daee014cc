"""RewardScorer: weighted sums in worker processes; raising, hanging and dying functions
become reward 0 plus a recorded, logged failure while the other samples are scored."""

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import time

import pytest

from cispo.config import RewardConfig
from rewards import RewardFunctionError, RewardScorer


def sample(prompt="3+4=", response="7", answer="7", mode="ok"):
    return {"prompt": prompt, "response": response, "answer": answer, "metadata": {"mode": mode}}


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(RewardConfig(functions=["builtin", "reward_helpers:flaky"], weights=[1.0, 0.5],
                                  timeout_s=1.0, num_workers=2))
    yield s
    s.close()


def test_weighted_sum_and_per_fn(scorer):
    res = scorer.score([sample(), sample(response="8"), sample(response="\\boxed{7}")])
    assert res.per_fn == {"builtin": [1.0, 0.0, 1.0], "reward_helpers:flaky": [1.0, 1.0, 1.0]}
    assert res.rewards == [1.5, 0.5, 1.5]
    assert res.failures == []
    assert res.metrics()["reward/failures"] == 0.0


def test_raise_and_hang_give_zero_and_failures(scorer, caplog):
    caplog.set_level(logging.WARNING, logger="cispo.rewards")
    restarts = scorer.restarts
    batch = [sample(), sample(mode="raise"), sample(mode="hang"), sample(response="8"), sample(mode="nan"),
             sample(mode="text")] + [sample() for _ in range(6)]
    t0 = time.monotonic()
    res = scorer.score(batch)
    wall = time.monotonic() - t0
    # The hang is cut at timeout_s=1 (plus a worker restart), not after its 1000 s sleep.
    assert wall < 6.0, wall
    assert res.per_fn["builtin"] == [1.0, 1.0, 1.0, 0.0] + [1.0] * 8  # builtin scored every sample
    flaky = res.per_fn["reward_helpers:flaky"]
    assert flaky[1] == flaky[2] == flaky[4] == flaky[5] == 0.0
    assert all(flaky[i] == 1.0 for i in (0, 3, *range(6, 12)))
    assert res.rewards[1] == 1.0 and res.rewards[2] == 1.0 and res.rewards[0] == 1.5
    reasons = {i: r for i, fn, r in res.failures}
    assert {fn for _, fn, _ in res.failures} == {"reward_helpers:flaky"}
    assert sorted(reasons) == [1, 2, 4, 5]
    assert reasons[1].startswith("ValueError: boom")
    assert "timeout after 1s" in reasons[2]
    assert "non-finite" in reasons[4] and "expected a float" in reasons[5]
    assert res.metrics()["reward/failures"] == 4.0
    assert scorer.restarts == restarts + 1
    logged = [r.getMessage() for r in caplog.records if r.name == "cispo.rewards"]
    assert any("'reward_helpers:flaky' failed on sample 2" in m and "timeout" in m for m in logged)
    assert any("'reward_helpers:flaky' failed on sample 1" in m and "boom" in m for m in logged)
    # the pool recovered: the next batch is scored normally
    assert scorer.score([sample()]).rewards == [1.5]


def test_dead_worker_is_a_failure_and_replaced(scorer):
    res = scorer.score([sample(mode="die"), sample()])
    assert res.rewards == [1.0, 1.5]
    assert res.failures[0][:2] == (0, "reward_helpers:flaky") and "worker process died" in res.failures[0][2]
    assert scorer.score([sample()]).rewards == [1.5]


def test_submit_and_async(scorer):
    fut1 = scorer.submit([sample()] * 4)
    fut2 = scorer.submit([sample(response="8")] * 4)  # two jobs in flight at once
    assert fut2.result(timeout=30).rewards == [0.5] * 4
    assert fut1.result(timeout=30).rewards == [1.5] * 4
    res = asyncio.run(scorer.ascore([sample()]))
    assert res.rewards == [1.5]
    assert scorer.score([]).rewards == []


def test_close_does_not_wait_for_a_hanging_function():
    s = RewardScorer(RewardConfig(functions=["reward_helpers:flaky"], timeout_s=60.0, num_workers=1))
    fut = s.submit([sample(mode="hang")])
    time.sleep(0.5)
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(RuntimeError, match="closed"):
        fut.result(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        s.submit([sample()])


def test_bad_configuration_fails_at_start():
    with pytest.raises(RewardFunctionError, match="unknown reward function 'nope'"):
        RewardScorer(RewardConfig(functions=["nope"]))
    with pytest.raises(RewardFunctionError, match="reward_helpers:missing"):
        RewardScorer(RewardConfig(functions=["reward_helpers:missing"]))
    with pytest.raises(RewardFunctionError, match="weights"):
        RewardScorer(RewardConfig(functions=["builtin"], weights=[1.0, 2.0]))


def test_recovers_when_an_idle_worker_is_killed_from_outside():
    """pebble may mark its pool broken when an idle worker dies; the scorer then starts a new
    pool and runs again the tasks the broken one dropped. No worker outlives close()."""
    before = {c.pid for c in mp.active_children()}
    s = RewardScorer(RewardConfig(functions=["reward_helpers:flaky"], timeout_s=5.0, num_workers=2))
    assert s.score([sample()]).rewards == [1.0]
    old = [c for c in mp.active_children() if c.pid not in before]
    assert len(old) == 2
    os.kill(old[0].pid, signal.SIGKILL)
    old[0].join(5)
    for wait in (0.0, 0.5):  # right away (pebble may not have noticed yet) and once it has
        time.sleep(wait)
        res = s.score([sample(), sample()])
        assert (res.rewards, res.failures) == ([1.0, 1.0], [])
    s.close()
    deadline = time.monotonic() + 10
    while [c for c in mp.active_children() if c.pid not in before] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [c for c in mp.active_children() if c.pid not in before] == []
