"""Invalid values fail at start-up with a message naming the key and what is allowed."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from cispo.config import Config, ConfigError
from cispo.config_checks import validate
from omegaconf import OmegaConf

from cispo.shaping import overlong_ramp
from launch.config import compose_config, to_dataclass


def test_default_config_composes_and_is_valid():
    cfg = compose_config()
    assert cfg.algorithm.name == "cispo"
    obj = to_dataclass(cfg)
    assert isinstance(obj, Config)
    validate(Config())  # the schema's own defaults are consistent too


@pytest.mark.parametrize("group", ["cispo", "grpo", "dapo"])
def test_each_algorithm_group_loads(group):
    assert compose_config([f"algorithm={group}"]).algorithm.name == group


def test_minimax_model_group_and_routing_replay_compose():
    cfg = compose_config(["model=minimax_tiny", "rollout.record_routing=true", "trainer.routing_replay=true",
                          "trainer.moe_aux_loss_coef=0.01"])
    assert cfg.model.path == "builtin:minimax-tiny" and cfg.trainer.routing_replay and cfg.rollout.record_routing


@pytest.mark.parametrize("experiment", [[], ["+experiment=long_addition"]])
def test_presets_are_valid_and_hold_sampling_equal(experiment):
    """Only what the algorithm is changes between presets: never the group size, the data
    or the schedule; DAPO's overlong ramp sits inside the generation budget."""
    cfgs = {name: compose_config([f"algorithm={name}", *experiment]) for name in ("cispo", "grpo", "dapo")}
    for key in ("algorithm.group_size", "data.rollout_batch_size", "rollout.max_new_tokens", "trainer.lr",
                "trainer.mini_batch_size", "steps", "seed"):
        values = {name: OmegaConf.select(cfg, key) for name, cfg in cfgs.items()}
        assert len(set(values.values())) == 1, (key, values)
    dapo = cfgs["dapo"]
    ramp = overlong_ramp(dapo.algorithm.overlong_buffer, dapo.rollout.max_new_tokens)
    assert 0 < ramp < dapo.rollout.max_new_tokens or dapo.rollout.max_new_tokens < 5


@pytest.mark.parametrize(
    "overrides,key,message",
    [
        # the combination that made every non-empty DAPO answer penalised on the default task
        (["algorithm=dapo", "algorithm.overlong_buffer=8"], "algorithm.overlong_buffer", ">= rollout.max_new_tokens=8"),
        (["algorithm.group_size=1", "data.rollout_batch_size=16"], "algorithm.group_size", "must be >= 2"),
        (["algorithm=grpo", "algorithm.token_mask=true"], "algorithm.token_mask", "CISPO's trust-region mask"),
        (["trainer.liger=true", "trainer.compile=true"], "trainer.liger/trainer.compile", "choose one"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(overrides, key, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert err.value.key == key and message in str(err.value)


@pytest.mark.parametrize(
    "override,key,message",
    [
        ("algorithm.name=ppo", "algorithm.name", "allowed values: cispo, grpo, dapo"),
        ("algorithm.eps_high=-0.1", "algorithm.eps_high", "must be >= 0.0"),
        ("algorithm.loss_agg=sum", "algorithm.loss_agg", "allowed values: token_mean, seq_mean_token_mean"),
        ("data.rollout_batch_size=60", "data.rollout_batch_size", "not divisible by algorithm.group_size=16"),
        ("trainer.mini_batch_size=24", "trainer.mini_batch_size", "does not divide data.rollout_batch_size=256"),
        ("trainer.zero_stage=4", "trainer.zero_stage", "allowed values: 0, 1, 2, 3"),
        ("trainer.old_logprobs=cached", "trainer.old_logprobs", "allowed values: rollout, recompute"),
        ("trainer.lm_head_mode=fp16", "trainer.lm_head_mode", "allowed values: auto, fp16x2, bf16x3"),
        ("trainer.attn_implementation=flash", "trainer.attn_implementation", "allowed values: sdpa, varlen"),
        ("rollout.temperature=0", "rollout.temperature", "must be > 0"),
        ("rollout.weight_sync=nfs", "rollout.weight_sync", "allowed values: collective, object_store"),
        ("rollout.max_restarts=-1", "rollout.max_restarts", "must be >= 0"),
        ("algorithm.behaviour_is=clip", "algorithm.behaviour_is", "allowed values: off, tis, mis"),
        ("rollout.max_model_len=16", "rollout.max_model_len", "smaller than data.max_prompt_tokens"),
        ("model.dtype=int8", "model.dtype", "allowed values: float32, bfloat16, float16"),
        ("logger.backends=[console,mlflow]", "logger.backends[1]", "allowed values: console, jsonl, wandb, tensorboard"),
        ("mode=offline", "mode", "allowed values: sync, async"),
        ("rollout.repetition_prob=0.3", "rollout.repetition_prob", "must be in [0.5, 1)"),
        ("rollout.top_p=0.9", "trainer.old_logprobs", "use trainer.old_logprobs=recompute"),
        ("max_staleness=-1", "max_staleness", "must be >= 0"),
        ("reward.weights=[1.0,2.0]", "reward.weights", "has 2 entries for 1 reward.functions"),
        ("trainer.moe_aux_loss_coef=-0.1", "trainer.moe_aux_loss_coef", "must be >= 0.0"),
        ("trainer.routing_replay=true", "trainer.routing_replay", "set rollout.record_routing=true"),
    ],
)
def test_invalid_values_name_the_key(override, key, message):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert err.value.key == key
    assert f"'{key}'" in str(err.value) and message in str(err.value)


def test_wrong_types_and_unknown_groups_are_rejected_by_hydra_with_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.zero_stage=two"])
    assert "trainer.zero_stage" in str(err.value.__cause__) or "trainer.zero_stage" in str(err.value)
    with pytest.raises(MissingConfigException, match="algorithm/ppo"):
        compose_config(["algorithm=ppo"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["trainer.no_such_key=1"])


def test_lm_head_modes_are_the_kernels_modes():
    """cispo/ cannot import kernels (torch only there), so the list is kept twice: keep it equal."""
    from cispo.config import LM_HEAD_MODES
    from kernels import MODES
    assert set(LM_HEAD_MODES) == {"auto", *MODES}
