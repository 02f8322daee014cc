"""Behaviour-policy correction (cispo.offpolicy): TIS / MIS, token and sequence level,
against values worked out by hand in float64, and through the objectives' loss interface."""

import dataclasses
import math

import pytest
import torch

from cispo import config as cfg_mod
from cispo.config import AlgorithmConfig, Config, ConfigError, TrainerConfig
from cispo.config_checks import validate
from cispo.objectives import policy_loss, resolve_algorithm
from cispo.offpolicy import LEVELS, MODES, BehaviourIS, behaviour_weights

# 4 tokens in 2 sequences; the last token is not trained (its ratio must not count)
PROX = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
BEHAV = torch.tensor([-1.5, -1.0, -0.5, -0.2], dtype=torch.float64)
MASK = torch.tensor([True, True, True, False])
SEQ = torch.tensor([0, 0, 1, 1])
# by hand: log w = 0.5, -1.0, 0.0 (masked: -)
E05, EM1 = math.exp(0.5), math.exp(-1.0)  # 1.6487..., 0.3678...


def run(mode, level, cap=1.5, floor=0.0):
    return behaviour_weights(PROX, BEHAV, MASK, SEQ, BehaviourIS(mode, level, cap, floor))


def test_token_tis_caps_each_token():
    w, s = run("tis", "token")
    assert w.dtype == torch.float32
    assert w.double().tolist() == pytest.approx([1.5, EM1, 1.0, 1.0], rel=1e-7)  # untrained token: 1
    assert s["behaviour_is_truncated_frac"] == pytest.approx(1 / 3)
    assert s["behaviour_is_weight_mean"] == pytest.approx((1.5 + EM1 + 1.0) / 3)
    assert s["behaviour_is_raw_weight_mean"] == pytest.approx((E05 + EM1 + 1.0) / 3)


def test_sequence_tis_uses_the_product_over_the_trained_tokens():
    w, s = run("tis", "sequence", cap=1.5)
    seq0 = math.exp(0.5 - 1.0)  # 0.6065: below the cap
    assert w.double().tolist() == pytest.approx([seq0, seq0, 1.0, 1.0], rel=1e-7)
    assert s["behaviour_is_truncated_frac"] == 0.0
    w, s = run("tis", "sequence", cap=1.0)  # no bound hit either: seq1's ratio is exactly 1
    assert s["behaviour_is_truncated_frac"] == 0.0
    # a sequence whose product exceeds the cap is capped as a whole
    w, s = behaviour_weights(PROX, BEHAV - torch.tensor([0.0, 0.0, 0.3, 0.0], dtype=torch.float64), MASK, SEQ,
                             BehaviourIS("tis", "sequence", 1.2))
    assert w.double().tolist() == pytest.approx([seq0, seq0, 1.2, 1.0], rel=1e-7)
    assert s["behaviour_is_truncated_frac"] == pytest.approx(1 / 3)


def test_token_mis_masks_outside_floor_and_cap():
    w, s = run("mis", "token", cap=1.5, floor=0.5)
    assert w.double().tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])  # e^0.5 > 1.5, e^-1 < 0.5
    assert s["behaviour_is_masked_frac"] == pytest.approx(2 / 3)
    assert s["behaviour_is_weight_mean"] == pytest.approx(1 / 3)
    w, _ = run("mis", "token", cap=2.0)  # without a floor the small weight stays, unchanged
    assert w.double().tolist() == pytest.approx([E05, EM1, 1.0, 1.0], rel=1e-7)


def test_sequence_mis_masks_whole_sequences():
    w, s = run("mis", "sequence", cap=1.5, floor=0.7)  # seq0: e^-0.5 = 0.61 < 0.7
    assert w.double().tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert s["behaviour_is_masked_frac"] == pytest.approx(2 / 3)


def test_off_is_all_ones_without_metrics():
    w, s = run("off", "token")
    assert torch.equal(w, torch.ones(4)) and s == {}


def _loop_reference(prox, behav, mask, seq, c: BehaviourIS):
    """The same rule written as a plain loop over sequences and tokens."""
    out = [1.0] * len(prox)
    for sid in set(seq):
        toks = [t for t in range(len(prox)) if seq[t] == sid]
        for t in toks:
            if not mask[t]:
                continue
            lw = sum(prox[u] - behav[u] for u in toks if mask[u]) if c.level == "sequence" else prox[t] - behav[t]
            w = math.exp(max(-20.0, min(20.0, lw)))
            if c.mode == "tis":
                w = min(w, c.cap)
            elif not (c.floor <= w <= c.cap):
                w = 0.0
            out[t] = w
    return out


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("level", LEVELS)
def test_random_batches_match_a_plain_loop(mode, level):
    seed = torch.seed() % 2**31
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    n = 300
    seq = torch.sort(torch.randint(0, 40, (n,), generator=g)).values
    seq = torch.unique(seq, return_inverse=True)[1]
    behav = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    # sequence-level sums stay within a few units so weights land on both sides of the cap
    prox = behav + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * (1.0 if level == "token" else 0.3)
    mask = torch.rand(n, generator=g) > 0.2
    c = BehaviourIS(mode, level, cap=1.3, floor=0.8 if mode == "mis" else 0.0)
    w, s = behaviour_weights(prox, behav, mask, seq, c)
    ref = _loop_reference(prox.tolist(), behav.tolist(), mask.tolist(), seq.tolist(), c)
    torch.testing.assert_close(w.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    frac = s["behaviour_is_truncated_frac" if mode == "tis" else "behaviour_is_masked_frac"]
    assert 0.0 < frac < 1.0  # the cap is exercised, not everything is hit


@pytest.mark.parametrize("name", ["cispo", "dapo"])
def test_weight_enters_the_loss_as_a_per_token_scale(name):
    """Through policy_loss's aggregation weights: loss and gradient of the decoupled
    objective, -w_t * f(pi/pi_old, A) per token, worked out per token by hand."""
    g = torch.Generator().manual_seed(3)
    n = 64
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
    behav = old + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.2
    agg = torch.full((n,), 1.0 / n, dtype=torch.float64)
    w, _ = behaviour_weights(old, behav, mask, torch.arange(n), BehaviourIS("tis", "token", 1.4))
    algo = resolve_algorithm(name)
    lp = logp.clone().requires_grad_(True)
    out = policy_loss(algo, lp, old, adv, agg * w.double(), mask)
    out.loss.backward()
    lo, hi = 1 - algo.clip.eps_low, 1 + algo.clip.eps_high
    ref_loss, ref_grad = 0.0, []
    for t in range(n):
        wt = min(math.exp(old[t] - behav[t]), 1.4) if mask[t] else 0.0
        r = math.exp(logp[t] - old[t])
        c = min(max(r, lo), hi)
        a = float(adv[t])
        if name == "cispo":
            ref_loss += -wt / n * c * a * float(logp[t])
            ref_grad.append(-wt / n * c * a)
        else:
            ref_loss += -wt / n * min(r * a, c * a)
            ref_grad.append(-wt / n * r * a if r * a <= c * a else 0.0)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-6)  # w is float32: ~1e-7 relative
    torch.testing.assert_close(lp.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_config_lists_agree_and_bad_values_name_their_key():
    assert cfg_mod.BEHAVIOUR_IS_MODES == MODES and cfg_mod.BEHAVIOUR_IS_LEVELS == LEVELS

    def conf(mode="sync", old="rollout", **alg):
        return Config(algorithm=AlgorithmConfig(**alg), trainer=TrainerConfig(old_logprobs=old), mode=mode)

    validate(conf())
    validate(conf("async", "recompute"))  # the default (tis) corrects the lag
    cases = [
        (conf(behaviour_is="clip"), "algorithm.behaviour_is", "allowed values: off, tis, mis"),
        (conf(behaviour_is_level="batch"), "algorithm.behaviour_is_level", "allowed values: token, sequence"),
        (conf(behaviour_is_cap=0.5), "algorithm.behaviour_is_cap", "must be >= 1.0"),
        (conf(behaviour_is="mis", behaviour_is_floor=1.0), "algorithm.behaviour_is_floor", "must be in [0, 1)"),
        (conf(behaviour_is_floor=0.5), "algorithm.behaviour_is_floor", "behaviour_is=mis only"),
        (conf("async", "recompute", behaviour_is="off"), "algorithm.behaviour_is", "one-version lag"),
    ]
    for c, key, message in cases:
        with pytest.raises(ConfigError) as e:
            validate(c)
        assert e.value.key == key and message in str(e.value), str(e.value)
    validate(dataclasses.replace(conf("sync", "recompute"), algorithm=AlgorithmConfig(behaviour_is="off")))
