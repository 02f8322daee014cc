"""bf16 training (ZeRO-2, 2 ranks): DeepSpeed keeps fp32 master weights, the FP32 head
computes log-probs in fp32 from bf16 activations, and the update goes where the float64
reference's goes (bf16 rounding allows no tighter check)."""

from __future__ import annotations

import copy

import torch

from cispo.config import AlgorithmConfig, TrainerConfig
from tests.trainer.helpers import random_trajectories, reference_updates, set_rollout_logprobs


def test_bf16_step_follows_the_reference(ray_cluster, tiny_model_path):
    from transformers import AutoModelForCausalLM

    from trainer import TrainerGroup

    model64 = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64, attn_implementation="eager")
    init = {n: p.detach().clone() for n, p in model64.named_parameters()}
    trajs = random_trajectories(8, vocab=model64.config.vocab_size, seed=4)
    set_rollout_logprobs(model64, trajs, 1.0, noise=0.3)
    cfg = TrainerConfig(num_ranks=2, zero_stage=2, dtype="bfloat16", lr=1e-2, micro_batch_tokens=32)
    group = TrainerGroup(tiny_model_path, cfg, AlgorithmConfig(), num_ranks=2)
    try:
        metrics = group.train_step(copy.deepcopy(trajs))
        got = group.state_dict()
        lp = group.compute_logprobs(trajs)
    finally:
        group.shutdown()
    ref, ref_losses, ref_norms = reference_updates(tiny_model_path, trajs, cfg, (1.0, 0.28), 1.0, 0, 1)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert abs(metrics["train/loss"] - ref_losses[0]) < 2e-2 * max(abs(ref_losses[0]), 1.0)
    assert abs(metrics["train/grad_norm"] - ref_norms[0]) < 5e-2 * ref_norms[0]
    agree = total = 0
    for name in ref:
        d_ref = ref[name] - init[name]
        d_got = got[name].double() - init[name].bfloat16().double()
        big = d_ref.abs() > 0.5 * cfg.lr  # elements the reference really moved
        agree += int((torch.sign(d_ref[big]) == torch.sign(d_got[big])).sum())
        total += int(big.sum())
    print(f"bf16: update sign agreement {agree / total:.4f} over {total} elements; "
          f"loss {metrics['train/loss']:.5f} vs {ref_losses[0]:.5f}; grad norm {metrics['train/grad_norm']:.5f} vs {ref_norms[0]:.5f}")
    assert agree / total > 0.95
    assert all(torch.isfinite(x).all() and x.dtype == torch.float32 for x in lp)
