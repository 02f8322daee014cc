"""transformers' MiniMax (hybrid lightning-attention MoE) under the trainer: packed rows,
routing replay and the load-balancing loss.

`attach(hf_model)` returns a `MoEControl` for a MoE model (None otherwise) after:

- packing: transformers' lightning attention carries one running state along the whole
  row, so in a packed row (sequences end to end, positions restarting at 0) every
  sequence would see the previous one's state. Each lightning layer's forward is wrapped
  to run transformers' own forward once per sequence (boundaries from the position
  restarts) and concatenate: the state starts from zero at every sequence, exactly as when
  the sequence runs alone (tests/trainer/test_minimax_trainer.py). The softmax layers
  already keep attention inside each sequence from the same position restarts.
- routing: each layer's router (transformers' MiniMaxTopKRouter, weight and name
  unchanged) becomes a `ReplayRouter`: when given the experts the rollout engine used
  (`Trajectory.routed_experts`), a token goes to those experts; their weights are still
  the live router's probabilities, renormalised over the chosen experts, so the router
  keeps its gradient. Tokens the engine did not record (-1) are routed live. Each router
  also keeps its last logits for the auxiliary loss.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

LINEAR_ATTENTION = "MiniMaxLightningAttention"
ROUTER = "MiniMaxTopKRouter"


def segment_bounds(position_ids: torch.Tensor) -> list[int]:
    """[0, s1, s2, ..., T]: where a new sequence starts in a packed row (position 0)."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return sorted({0, *starts}) + [int(position_ids.numel())]


_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def _decay_in_body_dtype(layer, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16/fp16 engine casts the parameters but not these buffers, and transformers'
    forward multiplies a bf16 block by an fp32 decay and then matmuls the (promoted) fp32 result
    with bf16 values: "expected scalar type Float but found BFloat16" (seen on an H200). Give the
    decays the body's dtype, as a model loaded in bf16 by transformers has them."""
    for name in _DECAY_BUFFERS:
        buf = getattr(layer, name, None)
        if buf is not None and buf.dtype != dtype:
            setattr(layer, name, buf.to(dtype))


def _packed_lightning_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                              past_key_values=None, position_ids=None, **kwargs):
    """transformers' lightning attention once per packed sequence (state reset at each)."""
    _decay_in_body_dtype(self, hidden_states.dtype)
    single = type(self).forward
    if past_key_values is not None or position_ids is None or hidden_states.shape[0] != 1:
        return single(self, hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    bounds = segment_bounds(position_ids[0])
    if len(bounds) == 2:
        return single(self, hidden_states, position_embeddings, attention_mask, None, **kwargs)
    mask = attention_mask
    outs = [
        single(self, hidden_states[:, a:b], None, None if mask is None else mask[:, a:b], None, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1), None


class ReplayRouter(nn.Module):
    """Mixed into transformers' MiniMaxTopKRouter (see `attach`): live routing, or the
    rollout's when `replay` holds expert ids for this forward's tokens."""

    replay: torch.Tensor | None = None  # [tokens, top_k], -1 = route live
    last_logits: torch.Tensor | None = None
    mismatched: int = 0  # tokens whose live choice differed from the replayed one (last forward)
    replayed: int = 0

    def forward(self, hidden_states):
        logits, scores, ids = super().forward(hidden_states)
        self.last_logits = logits
        if self.replay is None:
            return logits, scores, ids
        replay = self.replay.to(ids.device).long()
        use = (replay >= 0).all(dim=-1, keepdim=True)
        chosen = torch.where(use, replay, ids)
        with torch.no_grad():
            differs = (chosen.sort(dim=-1).values != ids.sort(dim=-1).values).any(dim=-1) & use[:, 0]
            self.mismatched, self.replayed = int(differs.sum()), int(use.sum())
        probs = torch.softmax(logits.float(), dim=-1).gather(1, chosen)
        return logits, (probs / probs.sum(dim=-1, keepdim=True)).to(scores.dtype), chosen


class MoEControl:
    """The MoE routers of one model, in layer order."""

    def __init__(self, hf_model: nn.Module, routers: list[nn.Module]):
        self.routers = routers
        self.num_experts = int(hf_model.config.num_local_experts)
        self.top_k = int(hf_model.config.num_experts_per_tok)

    def set_replay(self, routed_experts: torch.Tensor | None) -> None:
        """routed_experts [T, layers, top_k] for the next forward's T tokens, or None (live)."""
        if routed_experts is not None and routed_experts.shape[1:] != (len(self.routers), self.top_k):
            raise ValueError(f"routed_experts has shape {tuple(routed_experts.shape)}; this model routes "
                             f"[tokens, {len(self.routers)} layers, top {self.top_k}]")
        for i, router in enumerate(self.routers):
            router.replay = None if routed_experts is None else routed_experts[:, i]
            router.mismatched = router.replayed = 0

    def aux_loss(self) -> torch.Tensor:
        """Switch Transformer's load-balancing loss over the last forward's tokens
        (transformers' load_balancing_loss_func: num_experts * sum_e f_e * P_e, per layer summed)."""
        from transformers.models.minimax.modeling_minimax import load_balancing_loss_func

        logits = tuple(r.last_logits for r in self.routers)
        return load_balancing_loss_func(logits, self.num_experts, self.top_k)

    def replay_stats(self) -> dict[str, float]:
        return {"routing_replayed": float(sum(r.replayed for r in self.routers)),
                "routing_mismatched": float(sum(r.mismatched for r in self.routers))}


_REPLAY_CLASSES: dict[type, type] = {}


def _replay_class(router_cls: type) -> type:
    if router_cls not in _REPLAY_CLASSES:
        _REPLAY_CLASSES[router_cls] = type(f"Replay{router_cls.__name__}", (ReplayRouter, router_cls), {})
    return _REPLAY_CLASSES[router_cls]


def attach(hf_model: nn.Module) -> MoEControl | None:
    """Wrap the lightning layers for packed rows and the routers for replay (see the
    module docstring); None for a model without MiniMax routers."""
    routers = []
    for module in hf_model.modules():
        name = type(module).__name__
        if name == LINEAR_ATTENTION and "forward" not in module.__dict__:
            module.forward = types.MethodType(_packed_lightning_forward, module)
        elif name == ROUTER:
            # the same object (weight, name, ZeRO-3 partitioning unchanged), replay-aware
            module.__class__ = _replay_class(type(module))
            routers.append(module)
        elif isinstance(module, ReplayRouter):
            routers.append(module)
    return MoEControl(hf_model, routers) if routers else None


def moe_metrics(stats: dict[str, float], updates: int) -> dict[str, float]:
    """train/ metrics from the summed MoE stats of a step (nothing for dense models):
    the load-balancing loss per update, and the share of replayed tokens whose live router
    would have chosen other experts (what routing replay corrected)."""
    out = {}
    if "moe_aux_loss" in stats:
        out["train/moe_aux_loss"] = stats["moe_aux_loss"] / max(updates, 1)
    if stats.get("routing_replayed"):
        out["train/routing_replay_mismatch_frac"] = stats["routing_mismatched"] / stats["routing_replayed"]
    return out
