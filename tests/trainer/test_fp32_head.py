"""The chunked FP32 LM head against a float64 full-vocabulary log_softmax."""

from __future__ import annotations

import pytest
import torch

from trainer.fp32_head import FP32LogprobHead, head_logprobs, install_fp32_head


@pytest.fixture
def impl():
    """The head goes through kernels.lm_head_logprobs (its torch reference on CPU)."""
    return "kernels"


def _reference(hidden, weight, targets, temperature):
    logp = torch.log_softmax((hidden.double() @ weight.double().t()) / temperature, dim=-1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_float64(impl, chunk, temperature):
    g = torch.Generator().manual_seed(chunk)
    n, h, v = 37, 32, 301
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(v, h, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)

    lp, ent = head_logprobs(hidden, weight, targets, temperature, with_entropy=True, chunk_tokens=chunk)
    (lp * upstream).sum().backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref_lp, ref_ent = _reference(h64, w64, targets, temperature)
    (ref_lp * upstream.double()).sum().backward()

    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_are_computed_in_fp32(impl):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 32, generator=g).bfloat16().requires_grad_()
    weight = (0.2 * torch.randn(100, 32, generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, 100, (16,), generator=g)
    lp, _ = head_logprobs(hidden, weight, targets, 1.0, chunk_tokens=5)
    lp.sum().backward()
    ref, _ = _reference(hidden.detach(), weight.detach(), targets, 1.0)  # exact products of the bf16 values
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_head_module_keeps_the_parameter_and_plain_forward():
    lin = torch.nn.Linear(8, 11, bias=False)
    holder = torch.nn.Module()
    holder.lm_head = lin
    head = install_fp32_head(holder)
    assert isinstance(head, FP32LogprobHead) and head.weight is lin.weight
    x = torch.randn(3, 8)
    torch.testing.assert_close(head(x), lin(x))
    lp, ent = head(x, torch.tensor([1, 2, 3]), temperature=1.0, with_entropy=False)
    assert lp.shape == (3,) and ent is None
