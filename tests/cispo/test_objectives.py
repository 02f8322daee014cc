"""CISPO, GRPO and DAPO against float64 references derived by hand.

The references are written per token from the formulas (loss value and d loss /
d log pi), independently of cispo/objectives.py, and compared with the module's
loss and its autograd gradient. Inputs are fresh random data each run.
"""

import math

import pytest
import torch

from cispo.objectives import ALGORITHM_DEFAULTS, ClipRange, policy_loss, resolve_algorithm


def random_inputs(n=257, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 4 - 0.05
    # log-ratios spread over [-0.6, 0.6] so tokens fall on both sides of every clip bound
    logp = old + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 1.2
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.2
    weights = torch.rand(n, generator=g, dtype=torch.float64) / n
    return logp, old, adv, mask, weights


def hand_cispo(logp, old, adv, mask, w, eps_low, eps_high, token_mask):
    loss, grad = 0.0, []
    for lp, lo, a, m, wt in zip(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), w.tolist()):
        r = math.exp(lp - lo)
        c = min(max(r, 1 - eps_low), 1 + eps_high)
        keep = 1.0
        if token_mask and ((a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low)):
            keep = 0.0
        if not m:
            keep = 0.0
        loss += -wt * keep * c * a * lp  # c is a constant (stop-gradient)
        grad.append(-wt * keep * c * a)
    return loss, torch.tensor(grad, dtype=torch.float64)


def hand_ppo(logp, old, adv, mask, w, eps_low, eps_high):
    loss, grad = 0.0, []
    for lp, lo, a, m, wt in zip(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), w.tolist()):
        r = math.exp(lp - lo)
        c = min(max(r, 1 - eps_low), 1 + eps_high)
        if not m:
            grad.append(0.0)
            continue
        unclipped, clipped = r * a, c * a
        loss += -wt * min(unclipped, clipped)
        # d(r a)/d logp = r a while r a is the min (inside the clip range the two are equal);
        # once the clipped branch is the smaller one it is constant in logp
        grad.append(-wt * r * a if unclipped <= clipped else 0.0)
    return loss, torch.tensor(grad, dtype=torch.float64)


def module_loss_and_grad(algo, logp, old, adv, mask, w):
    lp = logp.clone().requires_grad_(True)
    out = policy_loss(algo, lp, old, adv, w, mask)
    out.loss.backward()
    return out, lp.grad


@pytest.mark.parametrize("token_mask", [False, True])
@pytest.mark.parametrize("eps", [(1.0, 0.28), (0.2, 0.2), (0.1, 0.05)])
def test_cispo_matches_hand_reference(token_mask, eps):
    logp, old, adv, mask, w = random_inputs()
    algo = resolve_algorithm("cispo", eps_low=eps[0], eps_high=eps[1], token_mask=token_mask)
    out, grad = module_loss_and_grad(algo, logp, old, adv, mask, w)
    ref_loss, ref_grad = hand_cispo(logp, old, adv, mask, w, eps[0], eps[1], token_mask)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_ppo_clip_baselines_match_hand_reference(name):
    logp, old, adv, mask, w = random_inputs()
    algo = resolve_algorithm(name)
    clip = ALGORITHM_DEFAULTS[name].clip
    out, grad = module_loss_and_grad(algo, logp, old, adv, mask, w)
    ref_loss, ref_grad = hand_ppo(logp, old, adv, mask, w, clip.eps_low, clip.eps_high)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-9)


def test_defaults_are_the_published_ones():
    assert resolve_algorithm("cispo").clip.eps_low >= 1.0  # no effective lower bound
    assert resolve_algorithm("cispo").loss_agg == "token_mean"
    assert resolve_algorithm("dapo").clip == ClipRange(0.2, 0.28)
    assert resolve_algorithm("grpo").clip == ClipRange(0.2, 0.2)
    assert resolve_algorithm("grpo").loss_agg == "seq_mean_token_mean"
    with pytest.raises(ValueError, match="algorithm.name='ppo2'.*allowed: cispo, grpo, dapo"):
        resolve_algorithm("ppo2")


def test_clipped_positive_tokens_keep_their_gradient_only_under_cispo():
    """Tokens with r > 1+eps_high and A > 0: PPO-clip's gradient is exactly zero, CISPO's is
    the clipped weight x A x grad log pi (checked through a real softmax policy's parameters)."""
    torch.manual_seed(torch.seed() % 2**31)
    eps_high, vocab, dim, n = 0.28, 11, 6, 16
    x = torch.randn(n, dim, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,))
    theta = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)

    def logp_of(th):
        return torch.log_softmax(x @ th.T, dim=-1).gather(1, targets[:, None]).squeeze(1)

    with torch.no_grad():
        lp_now = logp_of(theta)
    old = lp_now - torch.empty(n, dtype=torch.float64).uniform_(0.4, 1.5)  # r = e^0.4..e^1.5 > 1.28
    adv = torch.rand(n, dtype=torch.float64) + 0.1
    mask = torch.ones(n, dtype=torch.bool)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    assert (torch.exp(lp_now - old) > 1 + eps_high).all()

    grads = {}
    for name in ("cispo", "dapo", "grpo"):
        theta.grad = None
        policy_loss(resolve_algorithm(name, eps_high=eps_high), logp_of(theta), old, adv, w, mask).loss.backward()
        grads[name] = theta.grad.clone()
    assert torch.count_nonzero(grads["dapo"]) == 0
    assert torch.count_nonzero(grads["grpo"]) == 0

    # expected: -sum_t w_t (1+eps_high) A_t grad log pi_t
    expected = torch.zeros_like(theta)
    for t in range(n):
        g = torch.autograd.grad(logp_of(theta)[t], theta)[0]
        expected += -w[t] * (1 + eps_high) * adv[t] * g
    assert grads["cispo"].abs().max() > 1e-3
    torch.testing.assert_close(grads["cispo"], expected, rtol=1e-10, atol=1e-12)


def test_stats_count_clipped_weights_on_both_sides():
    old = torch.zeros(6, dtype=torch.float64)
    logp = torch.log(torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 3.0], dtype=torch.float64))
    mask = torch.tensor([True, True, True, True, True, False])
    algo = resolve_algorithm("dapo")  # clip to [0.8, 1.28]
    out = policy_loss(algo, logp, old, torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64), mask)
    assert out.stats["token_count"].item() == 5
    assert out.stats["clip_low_count"].item() == 1  # 0.5
    assert out.stats["clip_high_count"].item() == 1  # 1.5 (3.0 is masked)
    assert out.stats["is_weight_max"].item() == pytest.approx(1.5)
    assert out.stats["is_weight_sum"].item() == pytest.approx(0.5 + 0.9 + 1.0 + 1.1 + 1.5)
    # with A > 0 only r = 1.5 is past the trust region (r = 0.5 still gets a gradient)
    assert out.stats["grad_dropped_count"].item() == 1


def test_dropped_gradient_counts_follow_the_advantage_sign():
    old = torch.zeros(4, dtype=torch.float64)
    logp = torch.log(torch.tensor([0.5, 1.5, 0.5, 1.5], dtype=torch.float64))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    w = torch.ones(4, dtype=torch.float64)

    def dropped(name, **kw):
        return policy_loss(resolve_algorithm(name, **kw), logp, old, adv, w, mask).stats["grad_dropped_count"].item()

    assert dropped("dapo") == 2  # PPO drops (A>0, r=1.5) and (A<0, r=0.5)
    assert dropped("cispo") == 0  # CISPO keeps every token's gradient ...
    assert dropped("cispo", token_mask=True) == 1  # ... unless masked; no lower bound by default (eps_low=1)
    assert dropped("cispo", token_mask=True, eps_low=0.2) == 2


def test_masked_positions_with_nonfinite_logprobs_do_not_poison_loss_or_grad():
    logp, old, adv, mask, w = random_inputs(32)
    mask[3] = False
    logp[3] = -math.inf
    for name in ("cispo", "grpo"):
        out, grad = module_loss_and_grad(resolve_algorithm(name), logp, old, adv, mask, w)
        assert torch.isfinite(out.loss)
        assert torch.isfinite(grad).all() and grad[3] == 0
