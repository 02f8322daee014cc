"""Correctness of kernels.lm_head_logprobs: torch reference and Triton kernels (issue 4).

Runs on CPU: the Triton kernels execute in Triton's interpreter (TRITON_INTERPRET=1, set
below and in conftest.py before any kernel module is imported). Shapes are small and
deliberately not multiples of any block size (T=37, V=1013, H=72), so every kernel crosses
ragged edges in every dimension. Inputs are fresh random numbers each run; the seed is in
every failure message (set LM_HEAD_TEST_SEED to replay one).

What the interpreter cannot emulate: bf16 tensor-core products (it would multiply the raw
uint16 bit patterns) and rounded fp32->bf16 casts (it truncates). The kernels therefore keep
"bf16" values in fp32 registers under the interpreter, rounded to nearest-even with integer
bit operations, and multiply them with an exact fp32 dot: that is the same arithmetic as a
tensor core (bf16 x bf16 products are exact in fp32), up to the order of fp32 additions. The
GPU code path (real bf16 / tf32x3 dots) is checked against float64 by bench/kernels_lm_head.py.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import lm_head_logprobs, lm_head_logprobs_naive  # noqa: E402

try:
    import triton  # noqa: F401,E402
    HAVE_TRITON = True
except Exception:  # noqa: BLE001
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not importable")

T, V, H = 37, 1013, 72
TEMP = 0.7
# Max |error| vs float64 allowed per mode: (log p and entropy, gradients relative to their max).
# bf16x3 on two fp32 operands keeps 16 significant bits (~2^-16 per product); bf16 rounds inputs.
TOL64 = {"fp32": (1e-5, 1e-5), "tf32x3": (1e-5, 1e-5), "bf16x3": (2e-4, 1e-4), "bf16": (6e-2, 3e-2),
         "fp16x2": (1e-5, 1e-5)}
ALL_MODES = ["fp32", "tf32x3", "bf16x3", "bf16", "fp16x2"]


@pytest.fixture
def seed():
    s = int(os.environ.get("LM_HEAD_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(s)
    return s


def make_inputs(hidden_dtype=torch.float32, weight_dtype=torch.float32, t=T):
    """Logits with std ~2 and /0.7 temperature: peaked enough to matter, no overflow."""
    h = torch.randn(t, H).to(hidden_dtype)
    w = (torch.randn(V, H) * (2 / math.sqrt(H))).to(weight_dtype)
    tgt = torch.randint(0, V, (t,))
    tgt[0], tgt[1] = V - 1, 0  # the ragged last vocabulary block and the first column
    return h, w, tgt


def float64_reference(h, w, tgt, g_logp, g_ent, with_entropy=True):
    hd = h.double().requires_grad_()
    wd = w.double().requires_grad_()
    lp, ent = lm_head_logprobs_naive(hd, wd, tgt, TEMP, with_entropy)
    loss = (lp * g_logp.double()).sum()
    if with_entropy:
        loss = loss + (ent * g_ent.double()).sum()
    loss.backward()
    return lp.detach(), (ent.detach() if with_entropy else None), hd.grad, wd.grad


def run(h, w, tgt, g_logp, g_ent, mode, impl, with_entropy=True, chunk_tokens=24):
    hr = h.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    lp, ent = lm_head_logprobs(hr, wr, tgt, TEMP, with_entropy, mode, impl=impl,
                               chunk_tokens=chunk_tokens)
    loss = (lp * g_logp).sum()
    if with_entropy:
        loss = loss + (ent * g_ent).sum()
    loss.backward()
    return lp.detach(), (ent.detach() if with_entropy else None), hr.grad, wr.grad


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_to_max(a, b):
    return max_abs(a, b) / b.double().abs().max().item()


def check_all(got, ref, tol_val, tol_grad, seed, what):
    lp, ent, gh, gw = got
    lp0, ent0, gh0, gw0 = ref
    for name, x in (("logp", lp), ("entropy", ent), ("grad_hidden", gh), ("grad_weight", gw)):
        if x is not None:
            assert not torch.isnan(x).any(), f"{what}: NaN in {name} (unwritten?) seed={seed}"
    assert lp.dtype == torch.float32 and lp.shape == lp0.shape
    assert max_abs(lp, lp0) <= tol_val, f"{what}: logp err {max_abs(lp, lp0):.3g} seed={seed}"
    if ent0 is not None:
        assert ent.dtype == torch.float32
        assert max_abs(ent, ent0) <= 2 * tol_val, f"{what}: entropy err {max_abs(ent, ent0):.3g} seed={seed}"
    assert rel_to_max(gh, gh0) <= tol_grad, f"{what}: grad_hidden err {rel_to_max(gh, gh0):.3g} seed={seed}"
    assert rel_to_max(gw, gw0) <= tol_grad, f"{what}: grad_weight err {rel_to_max(gw, gw0):.3g} seed={seed}"


# ---------------------------------------------------------------- torch reference (CPU path)

def test_reference_matches_naive_log_softmax_gather(seed):
    h, w, tgt = make_inputs()
    lp, ent = lm_head_logprobs(h, w, tgt, TEMP, True, "fp32", impl="torch", chunk_tokens=8)
    z = (h @ w.t()) / TEMP
    lsm = torch.log_softmax(z, dim=-1)
    assert max_abs(lp, lsm.gather(1, tgt[:, None])[:, 0]) < 1e-5, seed
    assert max_abs(ent, -(lsm.exp() * lsm).sum(-1)) < 2e-5, seed


@pytest.mark.parametrize("mode", ALL_MODES)
def test_reference_fwd_bwd_vs_float64(seed, mode):
    h, w, tgt = make_inputs()
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    ref = float64_reference(h, w, tgt, g_logp, g_ent)
    got = run(h, w, tgt, g_logp, g_ent, mode, "torch")
    check_all(got, ref, *TOL64[mode], seed, f"torch/{mode}")


def test_reference_chunking_does_not_change_results(seed):
    h, w, tgt = make_inputs()
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    a = run(h, w, tgt, g_logp, g_ent, "fp32", "torch", chunk_tokens=5)
    b = run(h, w, tgt, g_logp, g_ent, "fp32", "torch", chunk_tokens=1024)
    for name, x, y in zip(("logp", "entropy", "grad_hidden", "grad_weight"), a, b):
        assert rel_to_max(x, y) < 1e-5, f"{name}: {rel_to_max(x, y):.3g} seed={seed}"


# ---------------------------------------------------------------- Triton kernels (interpreter)

@needs_triton
@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_triton_forward(seed, mode, with_entropy):
    h, w, tgt = make_inputs()
    lp, ent = lm_head_logprobs(h, w, tgt, TEMP, with_entropy, mode, impl="triton")
    lp64, ent64 = lm_head_logprobs_naive(h, w, tgt, TEMP, True)
    lp_ref, ent_ref = lm_head_logprobs(h, w, tgt, TEMP, True, mode, impl="torch")
    assert not torch.isnan(lp).any(), f"unwritten log-prob, seed={seed}"
    assert lp.dtype == torch.float32 and lp.shape == (T,)
    assert max_abs(lp, lp64) <= TOL64[mode][0], f"{mode}: {max_abs(lp, lp64):.3g} seed={seed}"
    # Same mode in torch: same rounding of the operands, so much closer than to float64.
    assert max_abs(lp, lp_ref) <= 2e-5, f"{mode}: vs torch {max_abs(lp, lp_ref):.3g} seed={seed}"
    if with_entropy:
        assert not torch.isnan(ent).any(), f"unwritten entropy, seed={seed}"
        assert max_abs(ent, ent64) <= 2 * TOL64[mode][0], seed
        assert max_abs(ent, ent_ref) <= 4e-5, seed
    else:
        assert ent is None


@needs_triton
@pytest.mark.parametrize("mode", ALL_MODES)
def test_triton_fwd_bwd_vs_float64_and_reference(seed, mode):
    """Entropy and log-prob both carry gradient; chunks of 24 tokens -> 2 chunks, the last
    ragged, so grad_weight is accumulated across chunks."""
    h, w, tgt = make_inputs()
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    got = run(h, w, tgt, g_logp, g_ent, mode, "triton")
    check_all(got, float64_reference(h, w, tgt, g_logp, g_ent), *TOL64[mode], seed, f"triton/{mode}")
    ref = run(h, w, tgt, g_logp, g_ent, mode, "torch")
    # bf16 mode rounds dlogits to bf16; ulp flips from a different fp32 summation order
    # move some gradient entries by one bf16 ulp (2^-8 relative).
    tols = (3e-5, 3e-5) + ((1e-2, 1e-2) if mode == "bf16" else (3e-5, 3e-5))
    for name, x, y, tol in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, ref, tols):
        assert rel_to_max(x, y) <= tol, f"{mode} {name} vs torch: {rel_to_max(x, y):.3g} seed={seed}"


@needs_triton
def test_triton_bwd_logprob_only_fp32(seed):
    h, w, tgt = make_inputs()
    g_logp = torch.randn(T)
    got = run(h, w, tgt, g_logp, None, "fp32", "triton", with_entropy=False, chunk_tokens=1024)
    ref = float64_reference(h, w, tgt, g_logp, None, with_entropy=False)
    check_all(got, ref, 1e-5, 1e-5, seed, "triton/fp32 logp-only")


@needs_triton
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bf16x3_with_bf16_hidden_is_fp32_accurate(seed, impl):
    """bf16 hidden (as out of a bf16 model) x fp32 weight: the weight is split in three bf16
    parts, the products are exact, so log-probs and grad_weight reach fp32 accuracy."""
    h, w, tgt = make_inputs(hidden_dtype=torch.bfloat16)
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    lp, ent, gh, gw = run(h, w, tgt, g_logp, g_ent, "bf16x3", impl)
    lp0, ent0, gh0, gw0 = float64_reference(h, w, tgt, g_logp, g_ent)
    assert max_abs(lp, lp0) <= 1e-5, f"{max_abs(lp, lp0):.3g} seed={seed}"
    assert max_abs(ent, ent0) <= 2e-5, f"{max_abs(ent, ent0):.3g} seed={seed}"
    assert rel_to_max(gw, gw0) <= 1e-5, f"{rel_to_max(gw, gw0):.3g} seed={seed}"
    assert gh.dtype == torch.bfloat16  # grads come back in the input's dtype
    assert rel_to_max(gh, gh0) <= 1e-2, seed  # bf16 rounding of the returned grad only


@needs_triton
def test_bf16x3_with_bf16_inputs_equals_exact_products(seed):
    """Both operands bf16: one exact product per tile, fp32 sums: fp32-accurate for these values."""
    h, w, tgt = make_inputs(torch.bfloat16, torch.bfloat16)
    lp, _ = lm_head_logprobs(h, w, tgt, TEMP, False, "bf16x3", impl="triton")
    lp64, _ = lm_head_logprobs_naive(h, w, tgt, TEMP)
    assert max_abs(lp, lp64) <= 1e-5, f"{max_abs(lp, lp64):.3g} seed={seed}"


@needs_triton
def test_bf16_mode_with_bf16_inputs(seed):
    h, w, tgt = make_inputs(torch.bfloat16, torch.bfloat16)
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    got = run(h, w, tgt, g_logp, g_ent, "bf16", "triton")
    ref = run(h, w, tgt, g_logp, g_ent, "bf16", "torch")
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert max_abs(got[0], ref[0]) <= 2e-5, seed
    for x, y in zip(got[2:], ref[2:]):
        assert rel_to_max(x, y) <= 2e-2, seed  # bf16 dlogits and bf16 outputs


@pytest.fixture
def small_vocab_chunks(monkeypatch):
    """fp16x2 splits the weight 256 rows at a time: V=1013 crosses 4 chunks, the last ragged."""
    import kernels.lm_head_triton_fp16x2 as fp16x2
    monkeypatch.setattr(fp16x2, "VOCAB_CHUNK", 256)


def test_fp16x2_backward_takes_more_vocabulary_rows_at_small_widths():
    """The same GPU work per inner backward iteration at every width (host overhead per
    iteration is fixed): 6144 rows at H>=4096, 16384 at Qwen2-0.5B's 896, never past V."""
    from kernels.lm_head_triton_fp16x2 import bwd_vocab_rows
    assert [bwd_vocab_rows(h, 151936) for h in (8192, 4096, 3584, 2048, 1536, 896)] == \
        [6144, 6144, 6144, 12288, 12288, 16384]
    assert bwd_vocab_rows(896, 1013) == 1013


@pytest.mark.parametrize("T,most,rows,chunks", [(16384, 4096, 4096, 4), (16384, 6144, 5504, 3), (37, 16, 16, 3),
                                                 (28672, 6144, 5760, 5), (5000, 4096, 2560, 2), (100, 4096, 100, 1)])
def test_fp16x2_backward_token_chunks_are_as_few_and_as_even_as_allowed(T, most, rows, chunks):
    """Each token chunk costs backward a walk over the weight and the buffers are sized by
    the largest chunk: as few chunks as `most` rows allow, evened out in 128-row blocks."""
    from kernels.lm_head_triton_fp16x2 import token_chunk_rows
    assert token_chunk_rows(T, most) == rows and -(-T // rows) == chunks


def bf16_rounding_error(ref):
    """Norm-wise error of the exact result rounded to bf16: the floor for a bf16 gradient."""
    ref = ref.double()
    return ((ref.to(torch.bfloat16).double() - ref).norm() / ref.norm()).item()


@needs_triton
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl,hi_steps", [("triton", 1), ("triton", 2), ("triton", 0), ("torch", 1)])
def test_fp16x2_with_bf16_hidden_is_fp32_accurate(seed, impl, hi_steps, weight_dtype,
                                                  small_vocab_chunks, monkeypatch):
    """The uses in training: bf16 hidden with an fp32 weight (2 products) or a bf16 weight
    (a bf16 model, tied embeddings: 1 product). 4 vocabulary chunks x 3 token chunks in
    backward (chunk_tokens=4 -> 16 tokens, T=37). Log-probs and entropy at fp32 accuracy;
    an fp32 grad_weight too; a gradient that comes back in bf16 is computed from one fp16
    product, so its error may exceed plain bf16 rounding of the exact gradient by <= 10%.
    The Triton kernels with the lo products summed apart and hi x hi added every K step or
    every 2 (HI_SUM_STEPS; H=72 is 3 steps of 32, so the last segment is short), and with
    every product in blocks (HI_SUM_STEPS = 0)."""
    import kernels.lm_head_triton_fwd as fwd
    monkeypatch.setattr(fwd, "HI_SUM_STEPS", hi_steps)
    h, w, tgt = make_inputs(hidden_dtype=torch.bfloat16, weight_dtype=weight_dtype)
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    lp, ent, gh, gw = run(h, w, tgt, g_logp, g_ent, "fp16x2", impl, chunk_tokens=4)
    lp0, ent0, gh0, gw0 = float64_reference(h, w, tgt, g_logp, g_ent)
    for name, x in (("logp", lp), ("entropy", ent), ("grad_hidden", gh), ("grad_weight", gw)):
        assert not torch.isnan(x).any(), f"NaN in {name} (unwritten?) seed={seed}"
    assert max_abs(lp, lp0) <= 1e-5, f"{max_abs(lp, lp0):.3g} seed={seed}"
    assert max_abs(ent, ent0) <= 2e-5, f"{max_abs(ent, ent0):.3g} seed={seed}"
    assert gh.dtype == torch.bfloat16 and gw.dtype == weight_dtype
    grads = [("grad_hidden", gh, gh0)]
    if weight_dtype == torch.float32:
        assert rel_to_max(gw, gw0) <= 1e-5, f"{rel_to_max(gw, gw0):.3g} seed={seed}"
    else:
        grads.append(("grad_weight", gw, gw0))
    for name, g, g0 in grads:
        err = ((g.double() - g0).norm() / g0.norm()).item()
        assert err <= 1.1 * bf16_rounding_error(g0), f"{name}: {err:.3g} seed={seed}"


@needs_triton
def test_fp16x2_grad_weight_in_one_stacked_product(seed, small_vocab_chunks, monkeypatch):
    """STACK_GRAD_W: an fp32 grad_weight's two products (dl_hi^T h + dl_lo^T h) as one product
    over stacked rows [dl_lo; dl_hi]^T @ [h; h]. Three token chunks, the last ragged (T=37,
    chunk 16): grad_weight at fp32 accuracy against float64 and equal to the separate products
    up to fp32 rounding; the other outputs bit for bit the same. Buffers start as NaN under
    the interpreter, so a row left unwritten in the stack shows up as NaN."""
    import kernels.lm_head_triton_fp16x2 as fp16x2
    h, w, tgt = make_inputs(hidden_dtype=torch.bfloat16, weight_dtype=torch.float32)
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    got = {}
    for stack in (True, False):
        monkeypatch.setattr(fp16x2, "STACK_GRAD_W", stack)
        got[stack] = run(h, w, tgt, g_logp, g_ent, "fp16x2", "triton", chunk_tokens=4)
    gw0 = float64_reference(h, w, tgt, g_logp, g_ent)[3]
    gw = got[True][3]
    assert not torch.isnan(gw).any(), f"NaN in the stacked grad_weight seed={seed}"
    assert rel_to_max(gw, gw0) <= 1e-5, f"{rel_to_max(gw, gw0):.3g} seed={seed}"
    assert rel_to_max(gw, got[False][3]) <= 1e-6, f"{rel_to_max(gw, got[False][3]):.3g} seed={seed}"
    for name, a, b in zip(("logp", "entropy", "grad_hidden"), got[True], got[False]):
        assert torch.equal(a, b), f"{name}: max diff {max_abs(a, b):.3g} seed={seed}"


@needs_triton
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_fp16x2_descriptor_loads_equal_pointer_loads(seed, weight_dtype, small_vocab_chunks,
                                                     monkeypatch):
    """On Hopper the fp16x2 kernels read their tiles through tensor descriptors (TMA), which
    fill zeros past the edges where the pointer loads mask. Run in the interpreter (H=72 is
    not a multiple of its 32-deep K blocks; T, V ragged too) the descriptor path must give
    the pointer path's log-probs, entropy and gradients bit for bit: the same tiles, the same
    products, the same order."""
    import kernels.lm_head_triton_fwd as fwd
    h, w, tgt = make_inputs(hidden_dtype=torch.bfloat16, weight_dtype=weight_dtype)
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    got = {}
    for tma in (False, True):
        monkeypatch.setattr(fwd, "TMA_IN_INTERPRETER", tma)
        got[tma] = run(h, w, tgt, g_logp, g_ent, "fp16x2", "triton", chunk_tokens=4)
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got[False], got[True]):
        assert not torch.isnan(b).any(), f"NaN in {name} with descriptors (unwritten?) seed={seed}"
        assert torch.equal(a, b), f"{name}: max diff {max_abs(a, b):.3g} seed={seed}"


@needs_triton
@pytest.mark.parametrize("persistent,tma_store", [(True, False), (False, True), (True, True)])
def test_fp16x2_dlogits_tile_walks_equal_one_tile_per_program(seed, persistent, tma_store,
                                                              small_vocab_chunks, monkeypatch):
    """dlogits' variants (PERSISTENT_DLOGITS: 3 programs walk all tiles in the interpreter;
    DLOGITS_TMA_STORE: its fp16 parts stored through descriptors, which drop what lies past
    the ragged edges of T=37 tokens and 256-row vocabulary chunks of V=1013) must give the
    one-tile-per-program kernel's results bit for bit. Descriptor loads on, in both runs
    (the stores need them); buffers start as NaN, so a tile no program walks shows up."""
    import kernels.lm_head_triton_bwd as bwd
    import kernels.lm_head_triton_fwd as fwd
    monkeypatch.setattr(fwd, "TMA_IN_INTERPRETER", True)
    h, w, tgt = make_inputs(hidden_dtype=torch.bfloat16, weight_dtype=torch.float32)
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    got = {}
    for variant in (False, True):
        monkeypatch.setattr(bwd, "PERSISTENT_DLOGITS", persistent and variant)
        monkeypatch.setattr(bwd, "DLOGITS_TMA_STORE", tma_store and variant)
        got[variant] = run(h, w, tgt, g_logp, g_ent, "fp16x2", "triton", chunk_tokens=4)
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got[False], got[True]):
        assert not torch.isnan(b).any(), f"NaN in {name} (a tile not walked?) seed={seed}"
        assert torch.equal(a, b), f"{name}: max diff {max_abs(a, b):.3g} seed={seed}"


@needs_triton
def test_fp16x2_backward_splits_the_weight_into_one_pair_of_buffers(seed, small_vocab_chunks,
                                                                   monkeypatch):
    """Backward walks the weight once per token chunk (3 here). Each walk used to allocate
    its own fp16 part buffers while the previous walk's were still held by the loop's
    variables: two pairs alive at the peak (64 MiB at H=4096 on a GPU). One pair now, for
    every walk, and the results stay fp32-accurate."""
    import kernels.lm_head_triton_fp16x2 as fp16x2
    calls = []
    real = fp16x2.part_buffers

    def counted(weight, two_parts, vocab_chunk):
        calls.append(vocab_chunk)
        return real(weight, two_parts, vocab_chunk)
    monkeypatch.setattr(fp16x2, "part_buffers", counted)
    h, w, tgt = make_inputs()  # fp32 both: every product, fp32 gradients
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    got = run(h, w, tgt, g_logp, g_ent, "fp16x2", "triton", chunk_tokens=4)
    assert len(calls) == 2, f"part buffers allocated {len(calls)} times (forward 1, backward 1)"
    check_all(got, float64_reference(h, w, tgt, g_logp, g_ent), 1e-5, 1e-5, seed, "fp16x2 walks")


@needs_triton
@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float32])
def test_fp16x2_descale_in_products_equals_a_pass_after(seed, hidden_dtype, small_vocab_chunks,
                                                        monkeypatch):
    """DESCALE_IN_PRODUCTS: the gradient products' power-of-two scales undone by the
    products' alpha, not by a pass over the fp32 results afterwards. Scaling by a power of two
    commutes with rounding, so both must give the same gradients bit for bit; the scales are
    far from 1 here (hidden ~1e5, weight ~1e-5, gradients ~1e-3), so a wrong or doubled
    alpha shows. Three token chunks, the last ragged; bf16 hidden (one grad_hidden product,
    stacked grad_weight) and fp32 hidden (every product)."""
    import kernels.lm_head_triton_fp16x2 as fp16x2
    h, w, tgt = make_inputs(hidden_dtype=hidden_dtype, weight_dtype=torch.float32)
    h, w = (h.float() * 1e5).to(hidden_dtype), w * 1e-5
    g_logp, g_ent = torch.randn(T) * 1e-3, torch.randn(T) * 1e-3
    got = {}
    for fold in (False, True):
        monkeypatch.setattr(fp16x2, "DESCALE_IN_PRODUCTS", fold)
        got[fold] = run(h, w, tgt, g_logp, g_ent, "fp16x2", "triton", chunk_tokens=4)
    ref = float64_reference(h, w, tgt, g_logp, g_ent)
    assert rel_to_max(got[True][3], ref[3]) <= 1e-5, f"{rel_to_max(got[True][3], ref[3]):.3g} seed={seed}"
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got[False], got[True]):
        assert not torch.isnan(b).any(), f"NaN in {name} seed={seed}"
        assert torch.equal(a, b), f"{name}: max diff {max_abs(a, b):.3g} seed={seed}"


@needs_triton
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp16x2_scales_operands_outside_fp16_range(seed, impl, small_vocab_chunks):
    """Hidden values up to ~4e5 (fp16 overflows at 65504) and weights ~1e-7 (fp16 subnormal):
    the power-of-two scaling keeps every part normal, so accuracy is unchanged."""
    h, w, tgt = make_inputs()
    h, w = h * 1e5, w * 1e-5
    g_logp, g_ent = torch.randn(T) * 1e-3, torch.randn(T) * 1e-3
    got = run(h, w, tgt, g_logp, g_ent, "fp16x2", impl, chunk_tokens=4)
    check_all(got, float64_reference(h, w, tgt, g_logp, g_ent), 1e-5, 1e-5, seed,
              f"{impl}/fp16x2 scaled")


# ---------------------------------------------------------------- API

def test_api_auto_on_cpu_leading_dims_and_errors(seed):
    h, w, tgt = make_inputs(t=10)
    lp, ent = lm_head_logprobs(h.view(2, 5, H), w, tgt.view(2, 5))  # auto -> torch on CPU
    assert lp.shape == (2, 5) and ent is None
    lp_ref, _ = lm_head_logprobs_naive(h, w, tgt, 1.0)
    assert max_abs(lp.reshape(-1), lp_ref) < 1e-5, seed
    with pytest.raises(ValueError, match="unknown mode 'fp16'"):
        lm_head_logprobs(h, w, tgt, mode="fp16")
    with pytest.raises(ValueError):
        lm_head_logprobs(h, w, tgt, temperature=0.0)
    with pytest.raises(ValueError):
        lm_head_logprobs(h, w[:, :10], tgt)
    lp0, ent0 = lm_head_logprobs(h[:0], w, tgt[:0], with_entropy=True)
    assert lp0.shape == (0,) and ent0.shape == (0,)


def test_import_and_cpu_path_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "h = torch.randn(4, 8); w = torch.randn(30, 8); t = torch.tensor([0, 1, 29, 5])\n"
            "lp, ent = kernels.lm_head_logprobs(h, w, t, with_entropy=True)\n"
            "assert lp.shape == (4,) and ent.shape == (4,)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": root})
