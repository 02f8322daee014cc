"""Log-probs (and entropy) of chosen tokens through the LM head, computed in FP32.

Why FP32: MiniMax-M1 found the train/rollout token-probability correlation goes from
0.987 to 0.997 when the LM head runs in FP32 on both sides; the rollout side already
does. Why chunked: a [tokens x vocab] fp32 logits tensor is 4k x 152k x 4 B = 2.5 GB
for one 4k-token sequence, and autograd would keep it for backward. Here the head
runs over `chunk_tokens` rows at a time, keeps only the per-row logsumexp, and the
backward recomputes each chunk's logits. That is `kernels.lm_head_logprobs` (the fused
Triton kernel on GPU, its chunked torch reference on CPU); this module only puts it
behind the model's `lm_head` so ZeRO-3's hooks still gather the weight.

Temperature is applied exactly as the rollout samples: log_softmax(logits / T).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kernels import lm_head_logprobs


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 1024,
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [n] fp32 with grad to hidden and weight, entropy [n] fp32 or None).

    hidden [n, H] (any float dtype), weight [V, H], targets [n] int64. `mode` is the
    kernel's product precision (trainer.lm_head_mode): "auto" = "fp16x2" on CUDA (Triton,
    fp32-accurate on tensor cores), "fp32" through the kernels' chunked torch reference
    elsewhere; "fp32" on CUDA is the slow exact FMA-unit mode.
    """
    lp, ent = lm_head_logprobs(hidden, weight, targets, temperature=temperature,
                               with_entropy=with_entropy, mode=mode, chunk_tokens=int(chunk_tokens))
    return lp, (ent.detach() if ent is not None else None)  # entropy is a statistic here


class FP32LogprobHead(nn.Linear):
    """Drop-in for the model's `lm_head` (same `weight` Parameter, so state_dict names,
    weight tying and ZeRO-3 partitioning are unchanged).

    Called with hidden states only it is the ordinary head (HF's own forward still
    works); called with `targets` it returns (logprobs, entropy) from the chunked FP32
    path. Going through the module's __call__ matters under ZeRO-3: its hooks gather
    the partitioned weight before forward and again before backward.
    """

    def forward(self, hidden, targets=None, temperature: float = 1.0, with_entropy: bool = False,
                chunk_tokens: int = 1024, mode: str = "auto"):
        if targets is None:
            return super().forward(hidden)
        return head_logprobs(hidden, self.weight, targets, temperature, with_entropy, chunk_tokens, mode)


def install_fp32_head(hf_model: nn.Module) -> FP32LogprobHead:
    """Replace `hf_model.lm_head` (an nn.Linear without bias) by an FP32LogprobHead
    sharing its weight Parameter."""
    old = hf_model.lm_head
    if isinstance(old, FP32LogprobHead):
        return old
    if getattr(old, "bias", None) is not None:
        raise ValueError("lm_head with a bias is not supported by the FP32 log-prob head")
    head = FP32LogprobHead(old.in_features, old.out_features, bias=False, device="meta")
    head.weight = old.weight  # the same Parameter object: tying and names survive
    hf_model.lm_head = head
    return head
