"""The policy as the trainer runs it: HF body on a packed row, FP32 head on chosen rows.

`PolicyModel` wraps a Hugging Face causal LM (kept as `self.hf`, so `self.hf`'s own
`state_dict()` names are the names every other component uses). Its forward takes one
packed, padding-free micro-batch and returns the log-probs of `targets` at the given
positions only — the body runs on all tokens, the head only where a loss is taken.

Packing: sequences are concatenated into one row with `position_ids` restarting at 0
per sequence. With `use_cache=False`, transformers (5.x) reads the restarts from
`position_ids` and keeps attention inside each sequence (block-diagonal causal mask
for sdpa/eager, varlen for flash-attention). With the cache on (the config default)
it silently attends across sequences — tests/trainer/test_packing.py proves the
packed row equals each sequence run alone. Given the batch's `cu_seqlens`, the attention
choices of trainer/attention.py skip the dense block-diagonal mask sdpa would build.
MiniMax's lightning-attention layers carry a state along the row; `trainer.minimax.attach`
makes them restart it at each sequence.

MoE models (MiniMax): `self.moe` (trainer.minimax.MoEControl) replays the rollout's
routing when the forward is given `routed_experts`, and has the load-balancing loss of
the last forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.attention import VARLEN_NAMES, attention_kwargs, register_varlen
from trainer.fp32_head import install_fp32_head
from trainer.minimax import attach as attach_moe


def load_hf_causal_lm(path: str, attn_implementation: str | None = None) -> nn.Module:
    """Load in fp32: DeepSpeed casts to bf16 itself and keeps fp32 master weights."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if attn_implementation in VARLEN_NAMES:
        register_varlen()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


class PolicyModel(nn.Module):
    def __init__(self, hf_model: nn.Module, chunk_tokens: int = 1024, head_mode: str = "auto"):
        super().__init__()
        self.hf = hf_model
        self.chunk_tokens = int(chunk_tokens)
        self.head_mode = head_mode  # see trainer.fp32_head.head_logprobs
        install_fp32_head(hf_model)
        self.moe = attach_moe(hf_model)  # None for dense models

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T], restarting per sequence
        positions: torch.Tensor,  # [n] indices into T where log-probs are wanted
        targets: torch.Tensor,  # [n] the token whose log-prob is wanted at each position
        temperature: float = 1.0,
        with_entropy: bool = False,
        cu_seqlens: torch.Tensor | None = None,  # [n+1] int32 on the device: the sequences' bounds
        max_seqlen: int | None = None,  # the longest sequence (a host int: no sync to find it)
        routed_experts: torch.Tensor | None = None,  # [T, moe_layers, top_k]: replay this routing
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.moe is not None:
            self.moe.set_replay(routed_experts)
        elif routed_experts is not None:
            raise ValueError("routed_experts given for a model without MoE routers")
        body = self.hf.get_decoder() if hasattr(self.hf, "get_decoder") else self.hf.model
        extra = attention_kwargs(self.hf.config, self.hf.config._attn_implementation, cu_seqlens, max_seqlen)
        hidden = body(
            input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False, **extra
        ).last_hidden_state[0]
        return self.hf.lm_head(
            hidden.index_select(0, positions), targets, temperature=temperature,
            with_entropy=with_entropy, chunk_tokens=self.chunk_tokens, mode=self.head_mode,
        )


def loss_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose targets are trained. A micro-batch with none (a filler, see
    trainer.packing) still takes position 0 so the whole graph runs: every rank must
    produce gradients for every parameter, or ZeRO's reductions would not line up."""
    pos = loss_mask.nonzero().flatten()
    return pos if pos.numel() else torch.zeros(1, dtype=torch.long, device=loss_mask.device)
