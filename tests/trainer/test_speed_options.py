"""The trainer's speed options (issue 13) keep its numbers.

* attention without a dense mask ("varlen", "flex_attention"): a packed micro-batch gives the
  log-probs, loss and gradients of sdpa's packed row (which tests/trainer/test_packing.py
  proves equal to padded and to each sequence alone), and each sequence alone gives the same
  (flex: log-probs and loss only; torch has no FlexAttention backward on CPU);
* activation checkpointing: the same loss and gradients, and the layers really run twice;
* torch.compile of the decoder layers: the same loss and gradients, one compiled graph for
  all layers;
* all of them through the real trainer path (DeepSpeed ZeRO-2, one in-process rank): the
  same update as the plain trainer.
Liger's fused layers run Triton kernels: tests/kernels/test_liger_layers.py (interpreter).
"""

from __future__ import annotations

import pytest
import torch

from cispo.aggregation import count_loss_seqs
from cispo.batch import pack
from cispo.config import TrainerConfig
from tests.trainer.test_packing import _alone, _assert_grads_close, _grads, _packed_loss, _trajs
from trainer.policy import PolicyModel, load_hf_causal_lm, loss_positions
from trainer.speed import apply_speed_options


def _policy(path, attn="sdpa", **options):
    hf = load_hf_causal_lm(path, attn)
    apply_speed_options(hf, TrainerConfig(**options))
    return PolicyModel(hf, chunk_tokens=16).train()


def _batch(policy):
    batch = pack(_trajs(policy.hf.config.vocab_size))
    return batch, batch.num_loss_tokens, count_loss_seqs(batch.loss_mask, batch.seq_index)


def _assert_same(a, b, rel=1e-5):
    assert a[0] == pytest.approx(b[0], rel=rel)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=2e-5)
    _assert_grads_close(a[2], b[2])


@pytest.fixture(scope="module")
def sdpa_packed(tiny_model_path):
    policy = _policy(tiny_model_path)
    batch, n_tok, n_seq = _batch(policy)
    return _grads(policy, lambda: _packed_loss(policy, batch, n_tok, n_seq))


@pytest.mark.parametrize("attn", ["varlen", "flex_attention"])
def test_attention_without_dense_mask_keeps_packed_equal_single(tiny_model_path, sdpa_packed, attn, monkeypatch):
    import trainer.attention

    segments = []  # varlen's CPU path: one causal sdpa per sequence (proves it ran, and where)
    per_sequence = trainer.attention._sdpa_per_sequence
    monkeypatch.setattr(trainer.attention, "_sdpa_per_sequence",
                        lambda q, k, v, cu, scale: segments.append(len(cu) - 1) or per_sequence(q, k, v, cu, scale))
    policy = _policy(tiny_model_path, attn)
    batch, n_tok, n_seq = _batch(policy)
    assert batch.num_seqs >= 4 and policy.hf.config._attn_implementation == attn
    if attn == "flex_attention":  # torch 2.13 has no FlexAttention backward on CPU: values only
        with torch.no_grad():
            for loss, lp in (_packed_loss(policy, batch, n_tok, n_seq), _alone(policy, batch, n_tok, n_seq)):
                assert float(loss) == pytest.approx(sdpa_packed[0], rel=1e-5)
                torch.testing.assert_close(lp, sdpa_packed[1], rtol=1e-5, atol=2e-5)
        return
    packed = _grads(policy, lambda: _packed_loss(policy, batch, n_tok, n_seq))
    assert segments == [batch.num_seqs] * policy.hf.config.num_hidden_layers  # each layer, every sequence
    _assert_same(packed, sdpa_packed)
    _assert_same(_grads(policy, lambda: _alone(policy, batch, n_tok, n_seq)), sdpa_packed)
    if attn == "varlen":  # without the bounds (compute paths, tests): found from position_ids
        def no_bounds(model):
            pos = loss_positions(batch.loss_mask)
            lp, _ = model(batch.input_ids, batch.position_ids, pos, batch.targets[pos], 0.8)
            return lp.sum(), torch.zeros(1)
        ref = _policy(tiny_model_path)
        a, b = _grads(policy, lambda: no_bounds(policy)), _grads(ref, lambda: no_bounds(ref))
        assert a[0] == pytest.approx(b[0], rel=1e-6)
        for name in a[2]:  # sum of log-probs: large gradients, compared relative to their max
            assert (a[2][name] - b[2][name]).abs().max() <= 1e-5 * b[2][name].abs().max(), name


@pytest.mark.parametrize("lengths", [[24, 24, 24], [40]])
def test_varlen_rows_of_one_length_run_as_a_dense_batch(lengths, monkeypatch):
    """A row whose sequences share one length goes to the dense causal batch (cuDNN on Hopper,
    sdpa here) without a host sync, with the outputs and gradients of one causal attention per
    sequence (float64, GQA 4/2); mixed lengths and "varlen_fa2" keep the per-sequence path."""
    import trainer.attention as att

    seed = 1234
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    T, hq, hk, d = sum(lengths), 4, 2, 8
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32)
    go = torch.randn(1, T, hq, d, generator=g, dtype=torch.float64)
    leaves = [torch.randn(1, h, T, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk)]
    dense_calls = []
    dense = att._dense_causal
    monkeypatch.setattr(att, "_dense_causal", lambda *a: dense_calls.append(a[3:5]) or dense(*a))

    def run(**kw):
        xs = [x.clone().requires_grad_() for x in leaves]
        out, _ = att.varlen_attention_forward(torch.nn.Module(), *xs, None, scaling=d ** -0.5,
                                              cu_seq_lens_q=cu, max_length_q=max(lengths), **kw)
        (out * go).sum().backward()
        return out, [x.grad for x in xs]

    out, grads = run()
    assert dense_calls == [(len(lengths), lengths[0])]
    ref_out, ref_grads = run(dense_rows=False)
    assert len(dense_calls) == 1  # varlen_fa2's switch: the per-sequence path
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if len(lengths) > 1:  # one sequence a token shorter, the next a token longer: mixed lengths
        mixed = cu.clone()
        mixed[1] -= 1
        att.varlen_attention_forward(torch.nn.Module(), *leaves, None, scaling=d ** -0.5, cu_seq_lens_q=mixed,
                                     max_length_q=lengths[0] + 1)
        assert len(dense_calls) == 1


def test_activation_checkpointing_same_loss_and_grads_and_recomputes(tiny_model_path, sdpa_packed):
    policy = _policy(tiny_model_path, activation_checkpointing=True)
    batch, n_tok, n_seq = _batch(policy)
    calls = []
    layer = policy.hf.model.layers[0]
    # a pre-hook: the recompute may stop early, once the tensors backward needs are back
    layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    ckpt = _grads(policy, lambda: _packed_loss(policy, batch, n_tok, n_seq))
    assert len(calls) == 2, "the layer ran once: nothing was recomputed in backward"
    assert ckpt[0] == sdpa_packed[0]
    for name in ckpt[2]:  # the recompute repeats the same CPU arithmetic: equal to fp32 rounding
        torch.testing.assert_close(ckpt[2][name], sdpa_packed[2][name], rtol=1e-6, atol=1e-9, msg=name)


def test_compiled_layers_same_loss_and_grads_one_graph(tiny_model_path, sdpa_packed):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    policy = _policy(tiny_model_path, compile=True)
    batch, n_tok, n_seq = _batch(policy)
    compiled = _grads(policy, lambda: _packed_loss(policy, batch, n_tok, n_seq))
    _assert_same(compiled, sdpa_packed)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, f"{graphs} graphs for {len(policy.hf.model.layers)} layers"


def test_trainer_update_with_options_equals_plain(tiny_model_path):
    """The real trainer path (TrainerWorker: DeepSpeed ZeRO-2, gloo, one in-process rank) with
    varlen + activation checkpointing + compiled layers takes the plain trainer's update:
    same statistics, gradient norm and weights afterwards.
    And DeepSpeed never makes an update wait for the device: its throughput timer (off in the
    trainer's config) calls the accelerator's synchronize() at every forward and step from
    its third step on, which on a GPU drains the queue three times a 2-micro-batch update
    (bench/results/gpu_session6_h200.md). (In this test, not one of its own: a second
    in-process DeepSpeed start after destroy_process_group finds DeepSpeed's cached groups stale.)"""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from cispo.config import AlgorithmConfig
    from trainer.packing import plan_micro_batches
    from trainer.worker import TrainerWorker

    def update(count_waits=False, **options):
        # adam_eps=1: the first Adam step is ~lr * g, not lr * sign(g), whose sign flips on
        # near-zero gradients would turn rounding-level differences into +-2 lr.
        cfg = TrainerConfig(num_ranks=1, zero_stage=2, dtype="float32", lr=1e-3, adam_eps=1.0,
                            micro_batch_tokens=40, logprob_chunk_tokens=16, **options)
        worker = TrainerWorker(0, 1, tiny_model_path, cfg, AlgorithmConfig(), temperature=0.8)
        worker.setup(*worker.address())
        before = {n: p.detach().clone() for n, p in worker.hf.named_parameters()}
        batch = pack(_trajs(worker.hf.config.vocab_size))
        plans, _ = plan_micro_batches(batch, list(range(batch.num_seqs)), 1, cfg.micro_batch_tokens)
        assert len(plans[0]) >= 3 and any(mb.num_seqs > 1 for mb in plans[0])  # packed micro-batches
        n_seqs = count_loss_seqs(batch.loss_mask, batch.seq_index)
        out = worker.train_micro_batches(plans[0], batch.num_loss_tokens, n_seqs, return_logprobs=True)
        weights = {n: p.detach().clone() for n, p in worker.hf.named_parameters()}
        if count_waits:
            acc, waits = get_accelerator(), []
            real = acc.synchronize
            acc.synchronize = lambda *a, **k: (waits.append(1), real(*a, **k))[1]
            try:
                for _ in range(3):  # updates 2-4: the timer syncs from its third step on
                    worker.train_micro_batches(plans[0], batch.num_loss_tokens, n_seqs)
            finally:
                del acc.synchronize  # the class's method again
            assert worker.updates == 4
            assert not waits, f"{len(waits)} accelerator synchronize() calls in updates 2-4"
        worker.engine.destroy()
        assert any((weights[n] != w).any() for n, w in before.items())  # the update moved the weights
        return out, weights

    try:
        plain, w_plain = update(count_waits=True)
        fast, w_fast = update(attn_implementation="varlen", activation_checkpointing=True, compile=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert fast["stats"].keys() == plain["stats"].keys()
    for key, value in plain["stats"].items():
        assert fast["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert fast["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    torch.testing.assert_close(fast["train_logprobs"], plain["train_logprobs"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(fast["old_logprobs"], plain["old_logprobs"], rtol=0, atol=0)
    for name, w in w_plain.items():
        torch.testing.assert_close(w_fast[name], w, rtol=1e-5, atol=1e-8, msg=name)
