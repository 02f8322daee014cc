"""Attention over packed micro-batches without a dense [T, T] mask (trainer.attn_implementation).

What transformers (5.17-5.19) does with a packed row: `masking_utils.find_packed_sequence_indices`
reads the restarts of `position_ids` and, for "sdpa" and "eager", `create_causal_mask`
materialises a dense [1, 1, T, T] block-diagonal causal mask (T^2 bytes; every layer's sdpa
then runs its masked kernel over all T^2 scores, masked blocks included, instead of flash
attention). A row holding one sequence gets no mask and sdpa's `is_causal` flash path. The
packing check itself is a host sync (`.all()` in a Python `if`) on every forward.

The choices here that avoid the dense mask:
* "varlen" (registered below): flash attention over the sequences' boundaries (cu_seqlens),
  `torch.ops.aten._flash_attention_forward` on CUDA (torch's own FA2 build: GQA native,
  autograd registered); on other devices an exact loop of causal sdpa per sequence (what the
  CPU tests run). The boundaries come from the packed batch (`attention_kwargs`), so no mask
  is built and nothing is synced.
  A row whose sequences all have one length (n x max_len == T: known on the host, no sync)
  is a dense [n, H, L, D] batch instead: on Hopper, cuDNN's causal kernel (wgmma; torch's FA2
  build has none), elsewhere causal sdpa. Measured on an H200 (bench/attention_varlen.py,
  bench/results/gpu_session8_h200.md), forward+backward of one micro-batch: 8 x 4k at
  Qwen2-0.5B's heads 2.32 ms against FA2's 3.62, 2 x 16k 8.00 against 12.12; Qwen2.5-3B's
  4 x 4k 2.08 against 3.75, 1 x 16k 7.38 against 12.45 (trainer MFU at 16k: 0.5B 31.7 -> 38.2%,
  3B 41.2 -> 49.9%). Rows of mixed lengths keep FA2: cuDNN's ragged form is broken in this
  torch, and one cuDNN call per sequence was slower than FA2 there (5.79 against 3.00 ms at 0.5B).
* "varlen_fa2": "varlen" with FA2 for every row (the dense cuDNN batch off).
* "flex_attention": transformers' FlexAttention path, which turns the same position_ids
  into a document BlockMask (blocks outside every sequence are skipped) and compiles
  torch's flex kernel. Heads are repeated for GQA unless their count is a power of two.
* "flash_attention_2": transformers' own varlen path; needs the flash-attn package.
"""

from __future__ import annotations

import torch

VARLEN = "varlen"
VARLEN_FA2 = "varlen_fa2"
VARLEN_NAMES = (VARLEN, VARLEN_FA2)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, cu_seq_lens_q=None, max_length_q=None, position_ids=None,
                             dense_rows=True, **kwargs):
    """transformers' attention-function contract: query [B, Hq, T, D], key/value [B, Hkv, T, D]
    -> ([B, T, Hq, D], None). Causal within each sequence of each row. dense_rows: a row of
    sequences of one length runs as a dense batch (see the module docstring)."""
    if dropout and module.training:
        raise ValueError("varlen attention has no dropout; set the model's attention_dropout to 0")
    if sliding_window is not None:
        raise ValueError("varlen attention has no sliding window; use trainer.attn_implementation=sdpa")
    if query.shape[0] != 1:  # a padded batch: each row one sequence (right padding only, see mask below)
        return torch.cat([varlen_attention_forward(module, query[b:b + 1], key[b:b + 1], value[b:b + 1], None,
                                                   scaling, dropout, dense_rows=dense_rows)[0]
                          for b in range(query.shape[0])]), None
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    T = q.shape[0]
    if cu_seq_lens_q is None:  # not given by the trainer: from position_ids (one host sync)
        starts = (position_ids[0] == 0).nonzero().flatten() if position_ids is not None else q.new_zeros(1, dtype=torch.long)
        cu_seq_lens_q = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
        max_length_q = None
    n_seq = cu_seq_lens_q.numel() - 1  # a shape: known on the host
    if dense_rows and max_length_q is not None and n_seq * max_length_q == T and dense_kernel_ok(q):
        out = _dense_causal(q, k, v, n_seq, max_length_q, scaling)  # every sequence max_length_q long
    elif q.is_cuda:
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q, scaling)
    else:
        out = _sdpa_per_sequence(q, k, v, cu_seq_lens_q.tolist(), scaling)
    return out[None], None


def dense_kernel_ok(q) -> bool:
    """Where a dense batch beats FA2 varlen: CPU (exact sdpa, what the tests run) and Hopper
    with cuDNN (the only GPUs measured; other GPUs keep FA2)."""
    if not q.is_cuda:
        return True
    return (q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def _dense_causal(q, k, v, n, length, scaling):
    """[T, H, D] rows of n sequences of `length` tokens as one [n, H, length, D] causal batch.
    CUDA: cuDNN's kernel called directly (sdpa's backend choice would need a context manager
    inside compiled layers); GQA is native there, as in FA2."""
    q, k, v = _half_precision(q, k, v)
    qs, ks, vs = (x.unflatten(0, (n, length)).transpose(1, 2) for x in (q, k, v))
    if q.is_cuda:
        o = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True, 0.0, True, False,
                                                               scale=scaling)[0]
    else:
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling,
                                                             enable_gqa=ks.shape[1] != qs.shape[1])
    return o.transpose(1, 2).flatten(0, 1)


def _half_precision(q, k, v):
    """The fused GPU kernels take bf16/fp16 only: cast under autocast, refuse plain fp32."""
    if not q.is_cuda or q.dtype in (torch.float16, torch.bfloat16):
        return q, k, v
    if not torch.is_autocast_enabled("cuda"):
        raise ValueError(f"varlen (flash) attention needs bf16/fp16 activations, got {q.dtype} "
                         "(trainer.dtype=bfloat16)")
    dt = torch.get_autocast_dtype("cuda")
    return q.to(dt), k.to(dt), v.to(dt)


def _flash_varlen(q, k, v, cu, max_len, scaling):
    q, k, v = _half_precision(q, k, v)
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device=q.device, dtype=torch.int32)
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                   scale=scaling)[0]


def _sdpa_per_sequence(q, k, v, cu: list[int], scaling):
    outs = []
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, n, D]
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling,
                                                             enable_gqa=ks.shape[1] != qs.shape[1])
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask interface's answer for "varlen": no mask. A padding mask cannot be honoured
    (the boundaries are all the kernel sees), so left padding is refused."""
    if attention_mask is not None and not bool(attention_mask[:, :1].all()):
        raise ValueError("varlen attention takes packed rows (or right-padded ones), not left padding")
    return None


def _varlen_fa2_forward(*args, **kwargs):
    return varlen_attention_forward(*args, **{**kwargs, "dense_rows": False})


def register_varlen() -> None:
    """Make "varlen" and "varlen_fa2" attn_implementations transformers accepts (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(VARLEN_FA2, _varlen_fa2_forward)
    for name in VARLEN_NAMES:
        AttentionMaskInterface.register(name, _varlen_mask)


def attention_kwargs(config, attn_implementation: str, cu_seqlens: torch.Tensor | None,
                     max_seqlen: int | None) -> dict:
    """Extra keyword arguments for the decoder body's forward on one packed row.

    cu_seqlens [n+1] int32 (on the model's device) and max_seqlen come from the packed batch.
    With them, "varlen" and "flash_attention_2" get the boundaries directly, and a row of one
    sequence under "sdpa" gets no mask (sdpa's causal flash path) — both skip transformers'
    mask building and its host sync. Other cases (eager, flex, several sequences under sdpa)
    build their mask from position_ids as before.
    """
    if cu_seqlens is None:
        return {}
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types):
        return {}  # sliding-window layers need their own masks
    no_mask = {"attention_mask": {t: None for t in set(layer_types)}}
    if attn_implementation in (*VARLEN_NAMES, "flash_attention_2"):
        return {**no_mask, "cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                "max_length_q": max_seqlen, "max_length_k": max_seqlen}
    if attn_implementation == "sdpa" and cu_seqlens.numel() == 2:
        return no_mask
    return {}
