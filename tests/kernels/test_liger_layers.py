"""trainer.liger: Liger-Kernel's RMSNorm, SwiGLU and rotary on the trainer's policy give the
plain model's log-probs, loss and gradients (fp32, tolerance below), on a packed micro-batch.

Liger's kernels are Triton; here they run in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), in fp32 only (the interpreter cannot emulate bf16 arithmetic, see
test_lm_head_kernels.py). Two interpreter gaps are bridged for these tests only: Python float
arguments stay Python floats there (compiled Triton passes them as fp32 scalars, which Liger's
RMSNorm calls `.to()` on), and `libdevice.rsqrt` has no interpreter implementation (its
`tl.math.rsqrt` has). On a GPU neither shim exists: bench/trainer_profile.py runs `+liger`.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("liger_kernel")

from cispo.aggregation import count_loss_seqs  # noqa: E402
from cispo.batch import pack  # noqa: E402
from tests.trainer.test_packing import _grads, _packed_loss, _trajs  # noqa: E402
from trainer.policy import PolicyModel, load_hf_causal_lm  # noqa: E402

# fp32, same math in another order (Liger: one fused pass per row): max |d| relative to the max
TOL = 2e-5


@pytest.fixture
def interpreter_shims(monkeypatch):
    import triton.language as tl
    from triton.runtime import interpreter

    import liger_kernel.ops.rms_norm as rms_norm

    original = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", implicit_cvt)
    monkeypatch.setattr(rms_norm, "rsqrt", lambda x: tl.math.rsqrt(x))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from launch.tiny_model import make_tiny_qwen2

    return str(make_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0))


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_liger_layers_match_the_plain_model(model_path, interpreter_shims, monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    from trainer.fused_layers import apply_liger

    # apply_liger swaps the modeling module's rotary function for a dispatcher for the rest of
    # the process; put the original back after this test (a later torch.compile test would
    # otherwise trace the dispatcher's context variable and break its graph)
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)

    plain = PolicyModel(load_hf_causal_lm(model_path), chunk_tokens=16).train()
    liger_hf = load_hf_causal_lm(model_path)
    counts = apply_liger(liger_hf)
    layers = liger_hf.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    liger = PolicyModel(liger_hf, chunk_tokens=16).train()

    batch = pack(_trajs(plain.hf.config.vocab_size))
    n_tok, n_seq = batch.num_loss_tokens, count_loss_seqs(batch.loss_mask, batch.seq_index)
    assert batch.num_seqs >= 4
    ref = _grads(plain, lambda: _packed_loss(plain, batch, n_tok, n_seq))
    graph = set()

    def liger_loss():
        loss, lp = _packed_loss(liger, batch, n_tok, n_seq)
        graph.update(_grad_fn_names(loss))
        return loss, lp

    got = _grads(liger, liger_loss)
    assert {"LigerRMSNormFunctionBackward", "LigerSiLUMulFunctionBackward", "LigerRopeFunctionBackward"} <= graph
    assert got[0] == pytest.approx(ref[0], rel=TOL)
    assert (got[1] - ref[1]).abs().max() <= TOL * ref[1].abs().max()
    for name in ref[2]:
        assert (got[2][name] - ref[2][name]).abs().max() <= TOL * ref[2][name].abs().max(), name

    # the patch is this instance's: a model built afterwards runs transformers' own layers
    again = PolicyModel(load_hf_causal_lm(model_path), chunk_tokens=16).train()
    again_loss = _grads(again, lambda: _packed_loss(again, batch, n_tok, n_seq))
    assert again_loss[0] == ref[0]
