"""Two GPUs: a vLLM engine on one, a trainer rank on the other (placement=split_1_1),
weights over NCCL; the asynchronous loop on top."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gpu_helpers import CUDA, GPUS, assert_engines_equal_trainer, check_logprobs, real_steps, running_system, record

pytestmark = pytest.mark.skipif(not CUDA or GPUS < 2, reason="needs 2 GPUs")


@pytest.fixture(scope="module")
def split(ray_gpus, gpu_model):
    with running_system(gpu_model, "split_1_1") as started:
        yield started


def test_split_sync_makes_the_engine_equal_the_trainer(split):
    _, system = split
    assert system.sync_weights(system.rollout.version + 1) == system.rollout.version
    record("split_sync", **system.sync_stats())
    assert_engines_equal_trainer(system)


def test_split_logprobs_agree(split):
    check_logprobs(split[1], "split_logprobs")


def test_split_steps_change_the_policy_and_the_engine_follows(split):
    conf, system = split
    before = assert_engines_equal_trainer(system)
    metrics = real_steps(system, conf, 2, system.rollout.version)
    after = assert_engines_equal_trainer(system)
    moved = sum(after[n] != before[n] for n in after) / len(after)
    record("split_steps", tensors_changed=moved, losses=[m["train/loss"] for m in metrics])
    assert moved >= 0.9


def test_async_loop_trajectories_carry_the_right_version(split, tmp_path):
    """The driver's own loop, mode=async: step k's batch was generated while step k-1
    trained, so it carries version k-1 (one behind) after the first step."""
    from launch.data import PromptDataset
    from launch.driver import StopFlag, loop
    from launch.evaluation import Evaluator
    from launch.length_schedule import LengthSchedule
    from launch.loggers import MetricLogger
    from launch.loop_state import LoopState
    from trainer.checkpoint import CheckpointDir

    conf, system = split
    start = system.rollout.version  # earlier tests advanced it; the loop continues from there
    conf = dataclasses.replace(conf, mode="async", steps=start + 3)
    logger = MetricLogger(["jsonl"], tmp_path)
    dataset = PromptDataset(conf.data, system.tokenizer, seed=0)
    loop(system, dataset, conf, logger, CheckpointDir(tmp_path / "checkpoints"), StopFlag(),
         LoopState(start, dataset.state_dict(), 0), LengthSchedule(conf.rollout), Evaluator(conf, system, tmp_path))
    logger.finish()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    record("async_loop", step_time_s=[r["perf/step_time_s"] for r in rows],
           generate_s=[r["perf/generate_s"] for r in rows], train_s=[r["perf/train_s"] for r in rows])
    assert [r["rollout/engine_version"] for r in rows] == [start + 1, start + 2, start + 3]
    assert [r["rollout/staleness_mean"] for r in rows] == [0, 1, 1]
    assert {(s["step"], s["version"]) for s in samples} == {(start, start), (start + 1, start), (start + 2, start + 1)}
