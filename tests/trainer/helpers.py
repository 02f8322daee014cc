"""Shared pieces of the trainer tests: random trajectories and a float64 reference step."""

from __future__ import annotations

import math

import torch

from cispo.batch import Trajectory


def random_trajectories(n: int, vocab: int, seed: int = 0, min_len: int = 4, max_len: int = 24) -> list[Trajectory]:
    """Prompts/responses of random lengths; rollout log-probs are filled in later."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 8, (1,), generator=g))
        r = int(torch.randint(min_len, max_len, (1,), generator=g))
        ids = torch.randint(4, vocab, (p + r,), generator=g).tolist()
        mask = None
        if i % 3 == 2:  # some responses with masked-out tokens
            mask = [bool(x) for x in (torch.rand(r, generator=g) > 0.3).tolist()]
        out.append(Trajectory(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logprobs=[0.0] * r,
                              finish_reason="stop", policy_version=0, group_id=i // 4,
                              advantage=float(torch.randn(1, generator=g)), response_mask=mask))
    return out


def seq_logprobs_f64(model, traj: Trajectory, temperature: float) -> torch.Tensor:
    """log p of each response token, the sequence run alone, logits in the model's dtype."""
    ids = torch.tensor(traj.prompt_ids + traj.response_ids)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0]
    p = len(traj.prompt_ids)
    logp = torch.log_softmax(logits[p - 1:-1] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(traj.response_ids)[:, None]).squeeze(1)


def set_rollout_logprobs(model, trajs, temperature: float, noise: float, seed: int = 1) -> None:
    """rollout log-probs = the model's own + uniform noise, so IS ratios spread and clip."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in trajs:
            lp = seq_logprobs_f64(model, t, temperature).double()
            t.rollout_logprobs = (lp + (torch.rand(lp.shape, generator=g, dtype=torch.float64) - 0.5) * 2 * noise).tolist()


def reference_cispo_loss(model, trajs, temperature, eps_low, eps_high, prox=None, tis_cap=None) -> torch.Tensor:
    """CISPO over a set of sequences, each run alone, token-mean over the set (float64 if model is).

    prox: per trajectory, a recomputed pi_old; the IS weight is then taken against it and
    each token is weighted by min(pi_old / pi_rollout, tis_cap) (token-level TIS)."""
    total_tokens = sum(sum(t.response_mask) if t.response_mask else len(t.response_ids) for t in trajs)
    loss = 0.0
    for i, t in enumerate(trajs):
        lp = seq_logprobs_f64(model, t, temperature)
        behaviour = torch.tensor(t.rollout_logprobs, dtype=lp.dtype)
        old = behaviour if prox is None else prox[i]
        ratio = torch.exp((lp.detach() - old).clamp(-20, 20))
        w = ratio.clamp(1 - eps_low, 1 + eps_high)
        if prox is not None:
            w = w * torch.exp(old - behaviour).clamp(max=tis_cap)
        m = torch.tensor(t.response_mask if t.response_mask else [True] * len(lp), dtype=lp.dtype)
        loss = loss + (-(w * t.advantage * lp) * m).sum() / total_tokens
    return loss


def reference_updates(model_path, trajs, cfg, alg_eps, temperature, mini_batch_size, epochs=1, tis_cap=None):
    """The trainer's updates re-done in float64 with plain torch: returns (weights, losses, grad_norms).
    With cfg.old_logprobs == "recompute", pi_old is the model before the step's first update and
    tokens carry the TIS behaviour weight min(pi_old / pi_rollout, tis_cap)."""
    from transformers import AutoModelForCausalLM

    from trainer.ds_setup import warmup_factor

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64, attn_implementation="eager")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay, foreach=False)
    size = mini_batch_size or len(trajs)
    prox = None
    if cfg.old_logprobs == "recompute":
        with torch.no_grad():
            prox = [seq_logprobs_f64(model, t, temperature) for t in trajs]
    losses, norms, k = [], [], 0
    for _ in range(epochs):
        for s in range(0, len(trajs), size):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * warmup_factor(k, cfg.warmup_steps)
            opt.zero_grad()
            loss = reference_cispo_loss(model, trajs[s:s + size], temperature, *alg_eps,
                                        prox=None if prox is None else prox[s:s + size], tis_cap=tis_cap)
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
            opt.step()
            losses.append(float(loss.detach()))
            k += 1
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, norms


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        worst = max(worst, float((x - y).abs().max()) / max(float(y.abs().max()), 1e-30))
    return worst if not math.isnan(worst) else float("inf")
