"""The LM head kept in FP32 inside vLLM while the body runs in bf16/fp16.

MiniMax-M1 found the train/inference token-probability mismatch comes mostly from the
LM head: with a bf16 head the correlation of probabilities was 0.987, with an fp32 head
0.997. So the rollout engine keeps its own fp32 copy of the head weight (of this
tensor-parallel rank's vocab shard), casts the final hidden state to fp32, and computes
the logits in fp32; the sampler and the returned log-probs are then fp32 end to end.

vLLM's `hf_overrides={"head_dtype": "float32"}` (0.32 only) gives fp32 logits but keeps
the head weight in the model dtype, so an fp32 weight the trainer sends would be rounded
to bf16 first; the copy here keeps it exact, and works on 0.24 too.

The copy must follow weight updates: `Fp32Head.set_rows` takes an fp32 tensor the
trainer sent (exact), `refresh` re-derives it from the live head after a load where the
head came in a lower precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rollout import vllm_compat as compat


def head_source_names(tied: bool) -> tuple[str, ...]:
    """Hugging Face names whose tensor is the LM head weight."""
    return ("lm_head.weight", "model.embed_tokens.weight") if tied else ("lm_head.weight",)


def read_checkpoint_tensor(model_path: str, names: tuple[str, ...]) -> torch.Tensor | None:
    """The first of `names` found in the folder's safetensors files, in its stored dtype
    (an fp32 checkpoint keeps its full precision even when the engine loads it as bf16)."""
    from safetensors import safe_open

    folder = Path(model_path)
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [(n, folder / weight_map[n]) for n in names if n in weight_map]
    else:
        files = [(n, f) for f in sorted(folder.glob("*.safetensors")) for n in names]
    for name, file in files:
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return None


class Fp32Head:
    """An fp32 copy of one rank's LM-head shard and the `compute_logits` that uses it."""

    def __init__(self, model: torch.nn.Module, full_weight: torch.Tensor | None = None):
        self.model = model
        self.head = compat.lm_head(model)
        self.rows = compat.head_shard_rows(self.head)
        live = self.head.weight
        self.weight = torch.zeros(live.shape, dtype=torch.float32, device=live.device)
        bias = compat.head_bias(self.head)
        self.bias = bias.detach().float().clone() if bias is not None else None
        if full_weight is not None and full_weight.dtype == torch.float32:
            self.set_rows(full_weight)
        else:
            self.refresh()

    def refresh(self) -> None:
        """Re-derive the copy from the live head (after a load in the model dtype)."""
        self.weight.copy_(self.head.weight.detach().float())
        if self.bias is not None:
            self.bias.copy_(compat.head_bias(self.head).detach().float())

    def set_rows(self, full_weight: torch.Tensor) -> None:
        """Take this rank's rows from the full [vocab, hidden] head weight, exactly."""
        start, end = self.rows
        self.weight[: end - start].copy_(full_weight[start:end].to(self.weight.device, torch.float32))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        local = F.linear(hidden_states.float(), self.weight, self.bias)
        return compat.finish_logits(self.model, local)
