"""RLSystem's start order, with recording stand-ins for its parts (the real parts start in
the end-to-end tests): engines start while the trainer ranks do when each has resources of
its own; colocated engines start after the ranks have offloaded (they measure the GPU memory
left free); CPUs that cannot hold every actor at once start them one after the other; and a
trainer that fails to start takes the engines already starting down with it."""

import pytest

import launch.system as system
from cispo.config import Config
from launch import placement


class Recorder:
    def __init__(self):
        self.calls: list[str] = []


@pytest.fixture
def events(monkeypatch):
    rec = Recorder()

    class Trainer:
        fail = False

        def __init__(self, *args, **kwargs):
            rec.calls.append("trainer start")
            if Trainer.fail:
                raise RuntimeError("trainer rank 0 failed")
            self.trainable_params = self.total_params = 10

        def offload_states(self):
            rec.calls.append("trainer offload")

        def weight_sync_plan(self, bucket_mb):
            return []

        def shutdown(self):
            rec.calls.append("trainer shutdown")

    class Rollout:
        def __init__(self, *args, wait_ready=True, **kwargs):
            rec.calls.append(f"rollout start wait_ready={wait_ready}")
            if wait_ready:
                self.wait_ready()

        def wait_ready(self):
            rec.calls.append("rollout ready")

        def shutdown(self):
            rec.calls.append("rollout shutdown")

    class Channel:
        plan = []

        def __init__(self, *args, **kwargs):
            self.lock = None

    class Reservation:
        def trainer_strategies(self):
            return None

        def rollout_strategies(self):
            return None

        def release(self):
            pass

    import transformers

    monkeypatch.setattr(system, "TrainerGroup", Trainer)
    monkeypatch.setattr(system, "RolloutGroup", Rollout)
    monkeypatch.setattr(system, "WeightChannel", Channel)
    monkeypatch.setattr(system, "Colocated", Channel)
    monkeypatch.setattr(system, "RewardScorer", lambda cfg: None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda path: None))
    monkeypatch.setattr(placement, "reserve", lambda layout, timeout: Reservation())
    rec.trainer = Trainer
    return rec


def conf_for(mode: str, gpus: int) -> Config:
    conf = Config()
    conf.placement.mode = mode
    if mode == "colocate":
        conf.placement.trainer_gpus = gpus
    elif gpus:
        conf.placement.rollout_gpus = conf.placement.trainer_gpus = gpus // 2
    return conf


def test_engines_start_while_the_trainer_does_when_the_cpus_hold_both(events, monkeypatch):
    monkeypatch.setattr(system, "_cpus_hold", lambda layout: True)
    system.RLSystem(conf_for("split", 0), "model")
    assert events.calls == ["rollout start wait_ready=False", "trainer start", "rollout ready"]


def test_split_gpus_start_side_by_side(events):
    system.RLSystem(conf_for("split", 2), "model")
    assert events.calls == ["rollout start wait_ready=False", "trainer start", "rollout ready"]


def test_colocated_engines_start_after_the_trainer_offloads(events):
    system.RLSystem(conf_for("colocate", 1), "model")
    assert events.calls == ["trainer start", "trainer offload", "rollout start wait_ready=True", "rollout ready"]


def test_cpus_that_cannot_hold_every_actor_start_them_in_turn(events, monkeypatch):
    monkeypatch.setattr(system, "_cpus_hold", lambda layout: False)
    system.RLSystem(conf_for("split", 0), "model")
    assert events.calls == ["trainer start", "rollout start wait_ready=True", "rollout ready"]


def test_a_trainer_that_fails_to_start_takes_the_starting_engines_down(events, monkeypatch):
    monkeypatch.setattr(system, "_cpus_hold", lambda layout: True)
    events.trainer.fail = True
    with pytest.raises(RuntimeError, match="trainer rank 0 failed"):
        system.RLSystem(conf_for("split", 0), "model")
    assert events.calls == ["rollout start wait_ready=False", "trainer start", "rollout shutdown"]


def test_cpus_hold_counts_every_rank_and_engine(monkeypatch):
    import ray

    layout = placement.plan(conf_for("split", 0).placement, num_ranks=2, num_engines=1)
    for cpus, holds in ((2.0, False), (3.0, True)):
        monkeypatch.setattr(ray, "cluster_resources", lambda cpus=cpus: {"CPU": cpus})
        assert system._cpus_hold(layout) is holds
