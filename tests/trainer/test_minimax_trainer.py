"""transformers' MiniMax (hybrid lightning-attention MoE) in the trainer's PolicyModel:
packed rows equal each sequence alone (the lightning state restarts at every sequence),
routing replay routes tokens to the recorded experts, the load-balancing loss is
transformers' own."""

from __future__ import annotations

import math

import pytest
import torch

from cispo.batch import pack
from tests.trainer.helpers import random_trajectories
from trainer.policy import PolicyModel, load_hf_causal_lm, loss_positions

SEED = 11


@pytest.fixture(scope="module")
def minimax_path(tmp_path_factory) -> str:
    """The minimax-tiny layout at a quarter of its size (3 lightning : 1 softmax layer)."""
    from launch.tiny_model import make_tiny_minimax

    small = dict(hidden_size=128, num_attention_heads=2, head_dim=64, intermediate_size=128, num_hidden_layers=4,
                 layer_types=["linear_attention"] * 3 + ["full_attention"], block_size=8)
    return str(make_tiny_minimax(tmp_path_factory.mktemp("models") / "minimax-small", seed=0, **small))


@pytest.fixture(scope="module")
def batch(minimax_path):
    from transformers import AutoConfig

    print(f"seed {SEED}")
    # responses of 12-30 tokens: every sequence spans blocks of transformers' lightning attention (8)
    trajs = random_trajectories(4, vocab=AutoConfig.from_pretrained(minimax_path).vocab_size, seed=SEED,
                                min_len=12, max_len=30)
    return trajs, pack(trajs)


def logprobs(policy, b, routed=None):
    pos = loss_positions(b.loss_mask)
    lp, _ = policy(b.input_ids, b.position_ids, pos, b.targets[pos], 1.0, routed_experts=routed)
    out = torch.zeros(b.num_tokens)
    out[pos] = lp
    return out


def live_routing(policy, b) -> torch.Tensor:
    """[T, layers, top_k] the experts the live routers pick on the packed row."""
    logprobs(policy, b)
    return torch.stack([torch.topk(torch.softmax(r.last_logits.float(), -1), policy.moe.top_k, -1).indices
                        for r in policy.moe.routers], dim=1)


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])  # varlen: trainer=gpu's attention
def test_packed_equals_each_sequence_alone(minimax_path, batch, attn):
    trajs, b = batch
    policy = PolicyModel(load_hf_causal_lm(minimax_path, attn), chunk_tokens=16)
    policy.zero_grad()
    packed = logprobs(policy, b)
    (packed * b.loss_mask).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    alone = torch.cat([logprobs(policy, pack([t])) for t in trajs])
    (alone * b.loss_mask).sum().backward()
    err = (packed - alone)[b.loss_mask].abs().max().item()
    print(f"max |logp packed - alone| = {err:.2e} over {b.num_loss_tokens} tokens")
    assert err < 2e-5
    for name, g in g_packed.items():
        torch.testing.assert_close(g, policy.get_parameter(name).grad, rtol=1e-3, atol=1e-6, msg=name)


def test_plain_transformers_leaks_state_across_packed_sequences(minimax_path, batch):
    """The check above can fail: without trainer.minimax the lightning state runs on from
    one packed sequence into the next."""
    trajs, b = batch
    hf = load_hf_causal_lm(minimax_path)
    with torch.no_grad():
        row = hf.model(input_ids=b.input_ids[None], position_ids=b.position_ids[None], use_cache=False).last_hidden_state[0]
        second = pack([trajs[1]])
        alone = hf.model(input_ids=second.input_ids[None], use_cache=False).last_hidden_state[0]
    start = int(b.cu_seqlens[1])
    assert (row[start : start + second.num_tokens] - alone).abs().max() > 1e-2


def test_routing_replay(minimax_path, batch):
    _, b = batch
    policy = PolicyModel(load_hf_causal_lm(minimax_path), chunk_tokens=16)
    live = live_routing(policy, b)
    base = logprobs(policy, b).detach()
    # the live routing replayed (as int16, the Trajectory's dtype) changes nothing
    assert torch.equal(logprobs(policy, b, live.to(torch.int16)).detach(), base)
    layers = len(policy.moe.routers)
    assert policy.moe.replay_stats() == {"routing_replayed": float(b.num_tokens * layers), "routing_mismatched": 0.0}

    # another routing: every token to experts (0, 3) in every layer, except rows of -1 (live)
    forced = torch.tensor([0, 3], dtype=torch.int16).expand(b.num_tokens, len(policy.moe.routers), 2).clone()
    forced[:5] = -1
    seen = []
    hooks = [layer.mlp.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
             for layer in policy.hf.model.layers]
    policy.zero_grad()
    replayed = logprobs(policy, b, forced)
    for h in hooks:
        h.remove()
    for layer_ids, live_ids in zip(seen, live.unbind(1)):
        assert torch.equal(layer_ids[5:], torch.tensor([0, 3]).expand(b.num_tokens - 5, 2))
        assert torch.equal(layer_ids[:5], live_ids[:5])
    assert (replayed - base)[b.loss_mask].abs().max() > 1e-3
    stats = policy.moe.replay_stats()
    assert stats["routing_replayed"] == (b.num_tokens - 5) * layers and 0 < stats["routing_mismatched"] <= stats["routing_replayed"]
    # the routing weights still come from the live router: it gets a gradient
    (replayed * b.loss_mask).sum().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in policy.moe.routers)
    with pytest.raises(ValueError, match="this model routes"):
        logprobs(policy, b, forced[:, :3])


def test_aux_loss_is_transformers_load_balancing_loss(minimax_path, batch):
    from transformers import AutoModelForCausalLM

    trajs, _ = batch
    one = pack([trajs[0]])
    policy = PolicyModel(load_hf_causal_lm(minimax_path), chunk_tokens=16)
    logprobs(policy, one)
    ours = policy.moe.aux_loss()
    ref = AutoModelForCausalLM.from_pretrained(minimax_path, dtype=torch.float32)(
        one.input_ids[None], output_router_logits=True).aux_loss
    print(f"aux loss {ours.item():.6f} (transformers {ref.item():.6f})")
    torch.testing.assert_close(ours, ref)
    assert ours.requires_grad


def test_bf16_body_with_fp32_decay_buffers_runs(minimax_path, batch):
    """DeepSpeed's bf16 engine casts parameters, not buffers: transformers' lightning forward then
    mixed an fp32 decay into a bf16 matmul and raised (seen on an H200). The body in bf16 with the
    buffers left in fp32 must run, and stay near the fp32 log-probs (bf16 rounding only)."""
    trajs, b = batch
    ref = logprobs(PolicyModel(load_hf_causal_lm(minimax_path, "sdpa"), chunk_tokens=16), b).detach()
    hf = load_hf_causal_lm(minimax_path, "sdpa")
    for p in hf.parameters():  # what DeepSpeed's bf16 engine does: parameters only
        p.data = p.data.to(torch.bfloat16)
    decays = [m for m in hf.modules() if type(m).__name__ == "MiniMaxLightningAttention"]
    assert decays and all(m.diagonal_decay.dtype == torch.float32 for m in decays)
    policy = PolicyModel(hf, chunk_tokens=16)
    got = logprobs(policy, b).detach()
    assert all(m.diagonal_decay.dtype == torch.bfloat16 for m in decays)
    err = (got - ref)[b.loss_mask].abs().mean().item()
    print(f"mean |logp bf16 body - fp32| = {err:.3e} over {b.num_loss_tokens} tokens")
    assert torch.isfinite(got).all() and err < 0.1


@pytest.mark.parametrize("pad_embedding", ["random", "zero"])
def test_sampled_pad_token_keeps_gradients_finite(tmp_path, pad_embedding):
    """A random policy samples <pad> now and then. With a zero <pad> embedding (padding_idx), that
    position's hidden state stays zero through MiniMax's post-norm layers and every RMSNorm's
    backward multiplies its gradient by 1/sqrt(eps): the NaN gradients once seen on minimax-tiny.
    The tiny model's <pad> now has a random embedding; the zero one shows the mechanism."""
    from launch.tiny_model import make_tiny_minimax

    # minimax-tiny itself: its 7 lightning layers before the softmax one keep the zero state the
    # whole way down, enough to overflow; a shorter stack only inflates the gradient
    over = {"pad_token_id": 0} if pad_embedding == "zero" else {}
    path = make_tiny_minimax(tmp_path / "m", seed=0, **over)
    hf = load_hf_causal_lm(str(path), "sdpa")
    pad_row = hf.model.embed_tokens.weight[0]
    assert (pad_row.abs().max() == 0) == (pad_embedding == "zero")
    trajs = random_trajectories(4, vocab=hf.config.vocab_size, seed=SEED, min_len=12, max_len=30)
    trajs[1].response_ids[3] = 0  # <pad>, sampled
    b = pack(trajs)
    policy = PolicyModel(hf, chunk_tokens=16)
    policy.zero_grad()
    lp = logprobs(policy, b)
    ((lp * b.loss_mask).sum() + policy.moe.aux_loss()).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in policy.parameters() if p.grad is not None)).item()
    print(f"<pad> embedding {pad_embedding}: grad norm {norm:.3e}")
    if pad_embedding == "random":
        assert math.isfinite(norm) and norm < 1e4
    else:
        assert not math.isfinite(norm)
