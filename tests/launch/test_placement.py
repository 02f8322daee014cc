"""Placement: presets that fit 1, 2 and 8 GPUs, validation naming the key, the bundles a
layout asks for, and the fit check against a real local Ray that declares GPUs it does
not have (num_gpus=2 on this CPU machine): Ray then assigns GPU ids and sets
CUDA_VISIBLE_DEVICES, so bundle shapes and sharing are checked without CUDA. Nothing
here starts a trainer or an engine on those GPUs (they do not exist)."""

from __future__ import annotations

import os
import time

import pytest

from cispo.config import ConfigError
from launch.config import compose_config, to_dataclass
from launch.placement import Node, PlacementError, check_fit, plan

GPU = ["rollout=gpu", "trainer=gpu"]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("preset,gpus,ranks,engines,mode", [
    ("colocate_1", 1, 1, 1, "colocate"),
    ("colocate_2", 2, 2, 2, "colocate"),
    ("split_1_1", 2, 1, 1, "split"),
    ("split_4_4", 8, 4, 4, "split"),
    ("colocate_8", 8, 8, 8, "colocate"),
])
def test_gpu_presets_take_their_counts_from_the_placement(preset, gpus, ranks, engines, mode):
    cfg = compose_config([*GPU, f"placement={preset}"])
    assert (cfg.placement.mode, cfg.trainer.num_ranks, cfg.rollout.num_engines) == (mode, ranks, engines)
    layout = plan(cfg.placement, cfg.trainer.num_ranks, cfg.rollout.num_engines, cfg.rollout.tensor_parallel_size)
    assert layout.gpus == gpus
    if mode == "colocate":  # the engine must leave the colocated trainer room
        assert cfg.rollout.gpu_memory_utilization <= 0.5


def test_default_is_the_cpu_placement_with_the_cpu_counts():
    cfg = compose_config()
    assert (cfg.placement.rollout_gpus, cfg.placement.trainer_gpus) == (0, 0)
    layout = plan(cfg.placement, cfg.trainer.num_ranks, cfg.rollout.num_engines)
    assert not layout.on_gpu and layout.bundles == ()
    assert [s.num_gpus for s in layout.trainer + layout.rollout] == [0.0, 0.0]


@pytest.mark.parametrize("overrides,key,message", [
    (GPU, "placement", "choose a GPU placement: placement=colocate_1"),
    (["placement.mode=colocate"], "placement.mode", "colocate needs GPUs"),
    ([*GPU, "placement=split_1_1", "placement.rollout_gpus=0"], "placement.rollout_gpus", "both 0"),
    ([*GPU, "placement=split_1_1", "trainer.num_ranks=2"], "trainer.num_ranks", "placement.trainer_gpus=1"),
    ([*GPU, "placement=split_4_4", "rollout.tensor_parallel_size=2"], "rollout.num_engines",
     "set rollout.num_engines=2"),
    ([*GPU, "placement=colocate_1", "mode=async"], "mode", "use mode=sync or placement.mode=split"),
    ([*GPU, "placement=colocate_2", "placement.rollout_gpus=1"], "placement.rollout_gpus", "must equal"),
    ([*GPU, "placement=split_4_4", "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=4"],
     "cluster.gpus_per_node", "needs 8 GPUs"),
    (["rollout.sync_port=70000"], "rollout.sync_port", "must be a TCP port"),
    (["placement.mode=spread"], "placement.mode", "allowed values: split, colocate"),
])
def test_bad_placements_name_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert err.value.key == key and message in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- layouts


def test_split_layout_gives_each_rank_and_engine_its_own_bundle():
    p = to_dataclass(compose_config([*GPU, "placement=split_4_4", "rollout.num_engines=2",
                                     "rollout.tensor_parallel_size=2"])).placement
    layout = plan(p, 4, 2, 2)
    assert layout.bundles == tuple([{"GPU": 1.0, "CPU": 1.0}] * 4 + [{"GPU": 2.0, "CPU": 1.0}] * 2)
    assert [s.bundle for s in layout.trainer] == [0, 1, 2, 3] and [s.bundle for s in layout.rollout] == [4, 5]
    assert [s.num_gpus for s in layout.rollout] == [2.0, 2.0]


def test_colocate_layout_pairs_rank_g_and_engine_g_in_bundle_g():
    p = to_dataclass(compose_config([*GPU, "placement=colocate_8"])).placement
    layout = plan(p, 8, 8)
    assert layout.colocated and layout.gpus == 8 and len(layout.bundles) == 8
    assert all(b == {"GPU": 1.0, "CPU": 2.0} for b in layout.bundles)
    assert [(t.bundle, r.bundle) for t, r in zip(layout.trainer, layout.rollout)] == [(g, g) for g in range(8)]
    assert all(t.num_gpus + r.num_gpus <= 1.0 for t, r in zip(layout.trainer, layout.rollout))


def test_fit_check_reports_asked_available_and_each_node():
    p = to_dataclass(compose_config([*GPU, "placement=split_4_4"])).placement
    p.trainer_gpus = 8  # what `trainer=gpu` asked before placements: 8 ranks + 1 engine
    layout = plan(p, 8, 1)
    with pytest.raises(PlacementError) as err:
        check_fit(layout, [Node("10.0.0.5", 8, 64)])
    msg = str(err.value)
    assert "asks for 9 GPU(s)" in msg and "has 8 GPU(s)" in msg and "node 10.0.0.5: 8 GPU, 64 CPU" in msg
    assert "placement=" in msg  # says what to change
    check_fit(plan(p, 4, 4), [Node("10.0.0.5", 8, 64)])  # split_4_4 fits the same node


def test_fit_check_needs_each_bundle_on_one_node():
    p = to_dataclass(compose_config([*GPU, "placement=split_1_1", "placement.rollout_gpus=2",
                                     "rollout.num_engines=1", "rollout.tensor_parallel_size=2"])).placement
    layout = plan(p, 1, 1, 2)  # one engine over 2 GPUs + one rank: 3 GPUs
    nodes = [Node("a", 2, 8), Node("b", 1, 8)]
    check_fit(layout, nodes)  # the engine on a, the rank on b
    with pytest.raises(PlacementError, match="a bundle must fit on one node"):
        check_fit(layout, [Node("a", 1, 8), Node("b", 1, 8), Node("c", 1, 8)])  # 3 GPUs, none has 2


def test_fit_check_reports_gpus_held_by_others():
    p = to_dataclass(compose_config([*GPU, "placement=split_1_1"])).placement
    with pytest.raises(PlacementError, match=r"only 1 GPU\(s\) and 4 CPU\(s\) are free now"):
        check_fit(plan(p, 1, 1), [Node("a", 2, 4)], {"GPU": 1.0, "CPU": 4.0})


# ----------------------------------------------------------------------------- real Ray, fake GPUs


@pytest.fixture(scope="module")
def fake_gpu_ray():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("another Ray session is live in this process")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


class Probe:
    """Stands where a trainer rank or an engine would: reports what Ray gave it."""

    def where(self):
        import ray

        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _place(ray, strategies, num_gpus):
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    cls = ray.remote(Probe)
    actors = [cls.options(num_cpus=1, num_gpus=num_gpus, scheduling_strategy=s).remote() for s in strategies]
    return actors, ray.get([a.where.remote() for a in actors], timeout=60)


def _free(ray, settle_s: float = 10.0):
    """The free GPUs and CPUs once released resources are back (Ray reports them late)."""
    deadline = time.monotonic() + settle_s
    while True:
        free = {k: ray.available_resources().get(k, 0.0) for k in ("GPU", "CPU")}
        if free == {"GPU": 2.0, "CPU": 4.0} or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def test_split_1_1_gets_two_distinct_gpus(fake_gpu_ray):
    ray = fake_gpu_ray
    from launch.placement import reserve

    p = to_dataclass(compose_config([*GPU, "placement=split_1_1"])).placement
    res = reserve(plan(p, 1, 1), timeout_s=30)
    try:
        _, trainer = _place(ray, res.trainer_strategies(), 1)
        _, engine = _place(ray, res.rollout_strategies(), 1)
        assert trainer[0]["gpu_ids"] != engine[0]["gpu_ids"]
        assert {trainer[0]["cuda_visible"], engine[0]["cuda_visible"]} == {"0", "1"}
    finally:
        res.release()


def test_colocate_2_shares_one_gpu_per_pair(fake_gpu_ray):
    ray = fake_gpu_ray
    from launch.placement import reserve

    p = to_dataclass(compose_config([*GPU, "placement=colocate_2"])).placement
    layout = plan(p, 2, 2)
    res = reserve(layout, timeout_s=30)
    try:
        _, trainer = _place(ray, res.trainer_strategies(), layout.trainer[0].num_gpus)
        _, engine = _place(ray, res.rollout_strategies(), layout.rollout[0].num_gpus)
        for g in range(2):  # rank g and engine g see the same single GPU ...
            assert trainer[g]["cuda_visible"] == engine[g]["cuda_visible"]
            assert len(trainer[g]["cuda_visible"].split(",")) == 1
        assert trainer[0]["cuda_visible"] != trainer[1]["cuda_visible"]  # ... and the pairs differ
    finally:
        res.release()
    assert _free(ray) == {"GPU": 2.0, "CPU": 4.0}


def test_unfit_placement_fails_at_once_and_reserves_nothing(fake_gpu_ray):
    ray = fake_gpu_ray
    from launch.placement import reserve

    p = to_dataclass(compose_config([*GPU, "placement=split_4_4"])).placement
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        reserve(plan(p, 4, 4), timeout_s=600)
    assert time.monotonic() - t0 < 5, "an unfit placement must not wait"
    assert "asks for 8 GPU(s)" in str(err.value) and ": 2 GPU, 4 CPU" in str(err.value)
    assert _free(ray) == {"GPU": 2.0, "CPU": 4.0}


def test_rl_system_with_an_unfit_placement_starts_no_actor(fake_gpu_ray, tmp_path):
    ray = fake_gpu_ray
    from launch.system import RLSystem

    conf = to_dataclass(compose_config([*GPU, "placement=split_4_4", f"output_dir={tmp_path}"]))
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="asks for 8 GPU"):
        RLSystem(conf, "/nonexistent-model")  # the check comes before the model is even read
    assert time.monotonic() - t0 < 5
    assert _free(ray) == {"GPU": 2.0, "CPU": 4.0}
