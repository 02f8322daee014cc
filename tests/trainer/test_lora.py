"""LoRA through peft in the DeepSpeed trainer, against a float64 plain-torch LoRA.

The reference re-does two RL steps of the CISPO loss by hand: each adapted linear layer
computes W x + (alpha / r) B (A x) with A, B float64 leaf tensors (no peft), AdamW on A
and B only. Two steps, because peft starts B at 0, so A's gradient (through B) is zero in
the first step and only the second moves it. The trainer's adapters, what it would send
to the engines (adapters only) and its merged Hugging Face export must match.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cispo.config import AlgorithmConfig, LoraConfig, TrainerConfig
from tests.trainer.helpers import random_trajectories, reference_cispo_loss, set_rollout_logprobs

TEMPERATURE = 0.8
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
CFG = TrainerConfig(num_ranks=1, zero_stage=2, dtype="float32", lr=5e-3, warmup_steps=0, adam_eps=1e-15,
                    grad_clip=0.0, micro_batch_tokens=64, logprob_chunk_tokens=16)
WEIGHT_ATOL_IN_LR = 2e-3


def reference_lora_steps(model_path, trajs, adapters0: dict, steps: int):
    """(A, B) per adapted layer after `steps` RL steps of plain-torch LoRA, float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64, attn_implementation="eager")
    model.requires_grad_(False)
    params = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] not in LORA.target_modules:
            continue
        a = adapters0[f"{name}.lora_A.default.weight"].double().clone().requires_grad_(True)
        b = adapters0[f"{name}.lora_B.default.weight"].double().clone().requires_grad_(True)
        params[name] = (a, b)

        def forward(x, w=module.weight, a=a, b=b):
            return F.linear(x, w) + LORA.scaling * F.linear(F.linear(x, a), b)

        module.forward = forward
    leaves = [t for pair in params.values() for t in pair]
    opt = torch.optim.AdamW(leaves, lr=CFG.lr, betas=(CFG.adam_beta1, CFG.adam_beta2), eps=CFG.adam_eps,
                            weight_decay=CFG.weight_decay, foreach=False)
    for _ in range(steps):
        opt.zero_grad()
        reference_cispo_loss(model, trajs, TEMPERATURE, 1.0, 0.28).backward()
        opt.step()
    return {name: (a.detach(), b.detach()) for name, (a, b) in params.items()}


@pytest.fixture(scope="module")
def lora_run(ray_cluster, tiny_model_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from trainer import TrainerGroup

    model64 = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64, attn_implementation="eager")
    trajs = random_trajectories(6, vocab=model64.config.vocab_size, seed=11)
    set_rollout_logprobs(model64, trajs, TEMPERATURE, noise=0.3)
    group = TrainerGroup(tiny_model_path, CFG, AlgorithmConfig(name="cispo", eps_high=0.28), num_ranks=1,
                         temperature=TEMPERATURE, seed=0, lora=LORA)
    try:
        before = group.state_dict()
        metrics = [group.train_step(copy.deepcopy(trajs)) for _ in range(2)]
        after = group.state_dict()
        out = tmp_path_factory.mktemp("lora") / "hf"
        group.export_hf(str(out))
        yield dict(group=group, trajs=trajs, before=before, after=after, metrics=metrics, export=out,
                   ref=reference_lora_steps(tiny_model_path, trajs, before, steps=2), base=model64)
    finally:
        group.shutdown()


def test_only_adapters_train_and_only_adapters_are_sent(lora_run):
    r = lora_run
    group, before, after = r["group"], r["before"], r["after"]
    # what a weight sync sends: exactly the adapters of the targeted layers
    layers = sorted(r["ref"])
    assert sorted(before) == sorted(f"{n}.lora_{x}.default.weight" for n in layers for x in "AB")
    assert group.num_params == sum(t.numel() for t in before.values())
    assert group.trainable_params == group.num_params < 0.2 * group.total_params
    assert all(float(t.abs().max()) == 0 for n, t in before.items() if "lora_B" in n)  # peft's init


def test_adapters_match_a_plain_torch_lora_step(lora_run):
    r = lora_run
    worst = 0.0
    for name, (a, b) in r["ref"].items():
        for got, want in ((r["after"][f"{name}.lora_A.default.weight"], a), (r["after"][f"{name}.lora_B.default.weight"], b)):
            worst = max(worst, float((got.double() - want).abs().max()))
    moved_a = max(float((r["after"][k] - r["before"][k]).abs().max()) for k in r["before"] if "lora_A" in k)
    print(f"LoRA adapters vs float64 plain-torch LoRA: max |diff| {worst / CFG.lr:.2e} lr; A moved {moved_a / CFG.lr:.2f} lr")
    assert moved_a > 0.1 * CFG.lr  # the second step moved A (else the test would not cover A's gradient)
    assert worst < WEIGHT_ATOL_IN_LR * CFG.lr


def test_export_is_the_merged_update_and_keeps_the_fp32_head(lora_run):
    from transformers import AutoModelForCausalLM

    r = lora_run
    exported = AutoModelForCausalLM.from_pretrained(r["export"], dtype=torch.float32)
    base = dict(r["base"].named_parameters())
    worst = 0.0
    for name, p in exported.named_parameters():
        want = base[name].detach()
        layer = name.removesuffix(".weight")
        if layer in r["ref"]:
            a, b = r["ref"][layer]
            want = want + LORA.scaling * (b @ a)
        elif not torch.equal(p.detach().double(), want):  # frozen: bitwise the base (head included)
            raise AssertionError(f"{name} changed though only adapters train")
        worst = max(worst, float((p.detach().double() - want).abs().max()))
    print(f"merged export vs W + s B A of the reference: max |diff| {worst / CFG.lr:.2e} lr")
    assert worst < WEIGHT_ATOL_IN_LR * CFG.lr
    assert exported.lm_head.weight.dtype == torch.float32
