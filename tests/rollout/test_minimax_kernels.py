"""The plain-torch lightning attention of rollout.models.minimax (its CPU path) against
transformers' MiniMaxLightningAttention, in float64: prefill in blocks, a prefill that
continues from a carried state (chunked prefill), and token-by-token decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rollout.models.minimax_kernels import decode_torch, hf_slopes, hf_topk_routing, prefill_torch

SEED = 1234


@pytest.fixture(scope="module")
def layer():
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    cfg = MiniMaxConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=8, block_size=8,
                        layer_types=["linear_attention"] * 7 + ["full_attention"])
    attn = MiniMaxLightningAttention(cfg, layer_idx=3).double()
    for p in attn.parameters():
        p.data.normal_(0, 0.2)
    # the decay buffers were made in fp32 at init: remake them in float64 from the slopes
    decays = attn.decay_factors(attn.slope_rate.double())
    attn.query_decay, attn.key_decay, attn.diagonal_decay = decays
    return attn


def qkv(attn, x):
    """What vLLM's layer hands its kernels: silu(qkv_proj(x)) split per head, [n, h, d]."""
    q, k, v = F.silu(attn.qkv_proj(x)).view(x.shape[0], attn.num_attention_heads, -1).split(attn.head_dim, dim=-1)
    return q, k, v


def reference(attn, x):
    """transformers' whole-sequence forward; returns the attention output before its norm
    (the norm works in fp32 whatever the input dtype, which would hide float64 differences)."""
    seen = []
    handle = attn.norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        attn(x[None], None, None)
    handle.remove()
    return seen[0][0]


def test_slopes_equal_transformers_buffers(layer):
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = MiniMaxConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=8,
                        layer_types=["linear_attention"] * 8)
    for i in (0, 3, 7):
        assert torch.equal(hf_slopes(4, i, 8), MiniMaxLightningAttention(cfg, layer_idx=i).slope_rate.float())


@pytest.mark.parametrize("split", [37, 16, 5])  # prompt 37 (several blocks of 8) then decode / a second chunk
def test_prefill_then_decode_equals_full_forward(layer, split):
    n = 37 + 11
    x = torch.randn(n, 64, dtype=torch.float64)
    ref = reference(layer, x)  # transformers' whole-sequence block algorithm
    with torch.no_grad():
        q, k, v = qkv(layer, x)
        state = torch.zeros(4, 16, 16, dtype=torch.float64)
        slope = layer.slope_rate.double()
        o = [prefill_torch(q[:split].transpose(0, 1), k[:split].transpose(0, 1), v[:split].transpose(0, 1),
                           state, slope, 8)]
        if split < 37:  # chunked prefill: a second chunk continues from the carried state
            o.append(prefill_torch(q[split:37].transpose(0, 1), k[split:37].transpose(0, 1), v[split:37].transpose(0, 1),
                                   state, slope, 8))
        cache = torch.zeros(3, 4, 16, 16, dtype=torch.float64)
        cache[1] = state
        slots = torch.tensor([-1, 1])  # a padding row, then our request
        for t in range(37, n):
            step = decode_torch(torch.stack([q[t], q[t]]), torch.stack([k[t], k[t]]), torch.stack([v[t], v[t]]),
                                cache, slots, slope)
            assert torch.equal(step[0], torch.zeros_like(step[0]))  # the padding row is left alone
            o.append(step[1:])
        got = torch.cat(o)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"split {split}: max |out - transformers| / max |out| = {err:.2e}")
    assert err < 1e-13
    # ... and the comparison can fail: a state not carried over shows up
    with torch.no_grad():
        fresh = prefill_torch(q[37:].transpose(0, 1), k[37:].transpose(0, 1), v[37:].transpose(0, 1),
                              torch.zeros(4, 16, 16, dtype=torch.float64), slope, 8)
    assert (fresh - ref[37:]).abs().max() > 1e-3 * ref.abs().max()


def test_routing_is_transformers_router():
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxTopKRouter

    torch.manual_seed(SEED)
    router = MiniMaxTopKRouter(MiniMaxConfig(hidden_size=32, num_local_experts=6, num_experts_per_tok=2))
    router.weight.data.normal_()
    x = torch.randn(50, 32)
    logits, scores, ids = router(x)
    w, i = hf_topk_routing(x, logits, 2, True)
    assert torch.equal(i, ids) and torch.equal(w, scores)
