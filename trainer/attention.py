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
* "flex_attention": transformers' FlexAttention path, which turns the same position_ids
  into a document BlockMask (blocks outside every sequence are skipped) and compiles
  torch's flex kernel. Heads are repeated for GQA unless their count is a power of two.
* "flash_attention_2": transformers' own varlen path; needs the flash-attn package.
"""

from __future__ import annotations

import torch

VARLEN = "varlen"


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, cu_seq_lens_q=None, max_length_q=None, position_ids=None,
                             **kwargs):
    """transformers' attention-function contract: query [B, Hq, T, D], key/value [B, Hkv, T, D]
    -> ([B, T, Hq, D], None). Causal within each sequence of each row."""
    if dropout and module.training:
        raise ValueError("varlen attention has no dropout; set the model's attention_dropout to 0")
    if sliding_window is not None:
        raise ValueError("varlen attention has no sliding window; use trainer.attn_implementation=sdpa")
    if query.shape[0] != 1:  # a padded batch: each row one sequence (right padding only, see mask below)
        return torch.cat([varlen_attention_forward(module, query[b:b + 1], key[b:b + 1], value[b:b + 1], None,
                                                   scaling, dropout)[0] for b in range(query.shape[0])]), None
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    T = q.shape[0]
    if cu_seq_lens_q is None:  # not given by the trainer: from position_ids (one host sync)
        starts = (position_ids[0] == 0).nonzero().flatten() if position_ids is not None else q.new_zeros(1, dtype=torch.long)
        cu_seq_lens_q = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
        max_length_q = None
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q, scaling)
    else:
        out = _sdpa_per_sequence(q, k, v, cu_seq_lens_q.tolist(), scaling)
    return out[None], None


def _flash_varlen(q, k, v, cu, max_len, scaling):
    if q.dtype not in (torch.float16, torch.bfloat16):
        if not torch.is_autocast_enabled("cuda"):
            raise ValueError(f"varlen (flash) attention needs bf16/fp16 activations, got {q.dtype} "
                             "(trainer.dtype=bfloat16)")
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
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


def register_varlen() -> None:
    """Make "varlen" an attn_implementation transformers accepts (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


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
    if attn_implementation in (VARLEN, "flash_attention_2"):
        return {**no_mask, "cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                "max_length_q": max_seqlen, "max_length_k": max_seqlen}
    if attn_implementation == "sdpa" and cu_seqlens.numel() == 2:
        return no_mask
    return {}
