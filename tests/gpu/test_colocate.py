"""One GPU shared by a trainer rank and a vLLM engine (placement=colocate_1): the engine
sleeps while the trainer steps and gets the weights by CUDA IPC."""

from __future__ import annotations

import pytest

from gpu_helpers import CUDA, assert_engines_equal_trainer, check_logprobs, real_steps, running_system, record

pytestmark = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture(scope="module")
def colocated(ray_gpus, gpu_model):
    with running_system(gpu_model, "colocate_1") as started:
        yield started


def test_colocated_logprobs_agree(colocated):
    check_logprobs(colocated[1], "colocate_logprobs")


def test_colocated_step_frees_and_restores_engine_memory(colocated):
    conf, system = colocated
    total_gib = system.trainer.memory()[0]["device_total"] / 2**30
    metrics = real_steps(system, conf, 1, system.rollout.version)[0]
    mem = dict(system.colocated.last_memory)
    record("colocate_memory", total_gib=total_gib, gpu_memory_utilization=conf.rollout.gpu_memory_utilization,
           **mem, **{k: v for k, v in metrics.items() if k.startswith("train/colocate")},
           sync=dict(system.colocated.last_sync), trainer=system.trainer.memory()[0])
    engine_share = conf.rollout.gpu_memory_utilization * total_gib
    # sleep hands back most of what the engine holds (weights + KV cache), waking takes it again
    assert mem["sleep_freed_gib"] >= 0.7 * engine_share, mem
    assert mem["wake_weights_gib"] + mem["wake_kv_gib"] >= 0.7 * engine_share, mem
    trajs = system.rollout.generate([[5, 6, 7]], n=2)  # the engine serves again, with the new policy
    assert all(t.policy_version == system.rollout.version for t in trajs) and trajs[0].response_ids
    assert_engines_equal_trainer(system)


def test_colocated_steps_change_the_policy_and_the_engine_follows(colocated):
    conf, system = colocated
    before = assert_engines_equal_trainer(system)
    fixed = system.rollout.generate([[5, 6, 7, 8]], n=4)
    lp0 = system.trainer.compute_logprobs(fixed)
    metrics = real_steps(system, conf, 2, system.rollout.version)
    after = assert_engines_equal_trainer(system)
    lp1 = system.trainer.compute_logprobs(fixed)
    moved = sum(after[n] != before[n] for n in after) / len(after)
    shift = float(sum((a - b).abs().mean() for a, b in zip(lp0, lp1)) / len(lp0))
    record("colocate_steps", tensors_changed=moved, mean_abs_logp_shift=shift,
           losses=[m["train/loss"] for m in metrics], grad_norms=[m["train/grad_norm"] for m in metrics])
    assert moved >= 0.9 and shift > 1e-3
    check_logprobs(system, "colocate_logprobs_after_steps")
