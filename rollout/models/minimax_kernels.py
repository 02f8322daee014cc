"""The arithmetic of MiniMax's lightning attention and routing in plain torch, as
transformers computes it: the CPU path of rollout.models.minimax (vLLM's lightning
kernels are Triton, which has no CPU backend) and the routing both paths share.
Imports torch only, so it is testable without vLLM."""

from __future__ import annotations

import torch


def hf_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates as transformers' MiniMaxLightningAttention computes them
    ([heads, 1, 1] fp32): base**(1..h), base = 2**(-8/h), scaled down with depth."""
    base = 1 / (2 ** (8 / num_heads))
    exponent = torch.arange(num_heads) + 1
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (base**exponent * factor)[:, None, None].float()


def prefill_torch(q, k, v, state, slope, block_size: int) -> torch.Tensor:
    """One sequence's lightning attention in blocks, as transformers computes it.

    q, k, v [h, n, d] (fp32), state [h, d, e] (the running sum of decayed k^T v, updated
    in place), slope [h, 1, 1]. Within a block: (q k^T * decay(i - j)) v; from earlier
    blocks: (q * decay(i + 1)) @ state. Returns [n, h * e]."""
    h, n, d = q.shape
    dt = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 in tests)
    q, k, v, s, kv = q.to(dt), k.to(dt), v.to(dt), slope.to(dt), state.to(dt)
    out = []
    for start in range(0, n, block_size):
        c = min(block_size, n - start)
        qb, kb, vb = q[:, start : start + c], k[:, start : start + c], v[:, start : start + c]
        r = torch.arange(c, device=q.device) + 1
        q_decay = torch.exp(-s * r[:, None])  # [h, c, 1]
        k_decay = torch.exp(-s * (c - r[:, None]))  # [h, c, 1]
        diff = (r[:, None] - r[None, :])[None]
        diag = torch.exp(torch.where(diff >= 0, -s * diff, float("-inf")))  # [h, c, c]
        intra = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * diag, vb)
        inter = torch.matmul(qb * q_decay, kv)
        out.append(intra + inter)
        kv = kv * torch.exp(-s * c) + torch.matmul((kb * k_decay).transpose(-1, -2), vb)
    state.copy_(kv.to(state.dtype))
    o = torch.cat(out, dim=1) if out else q.new_zeros(h, 0, v.shape[-1])
    return o.transpose(0, 1).reshape(n, -1)


def decode_torch(q, k, v, cache, slots, slope) -> torch.Tensor:
    """One new token per request: state = exp(-slope) * state + k^T v; out = q @ state.
    q, k, v [b, h, d]; cache [slots, h, d, e]; slots [b] (negative: a padding row)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    live = (slots >= 0).nonzero().flatten()
    if live.numel():
        idx = slots[live].long()
        ratio = torch.exp(-slope.to(dt)).view(1, -1, 1, 1)
        state = ratio * cache[idx].to(dt) + k[live].to(dt)[..., :, None] * v[live].to(dt)[..., None, :]
        out[live] = torch.einsum("bhd,bhde->bhe", q[live].to(dt), state).to(q.dtype)
        cache[idx] = state.to(cache.dtype)
    return out.reshape(q.shape[0], -1)


def hf_topk_routing(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool):
    """transformers' MiniMaxTopKRouter: softmax over fp32 logits, top-k, weights renormalised."""
    probs = torch.softmax(gating_output.float(), dim=-1)
    weights, ids = torch.topk(probs, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
