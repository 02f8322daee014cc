"""The LM head kept in FP32 inside vLLM while the body runs in bf16/fp16.

MiniMax-M1 found the train/inference token-probability mismatch comes mostly from the
LM head: with a bf16 head the correlation of probabilities was 0.987, with an fp32 head
0.997. So the rollout engine keeps its own fp32 copy of the head weight (of this
tensor-parallel rank's vocab shard), casts the final hidden state to fp32, and computes
the logits in fp32; the sampler and the returned log-probs are then fp32 end to end.

vLLM's `hf_overrides={"head_dtype": "float32"}` (0.32 only) gives fp32 logits but keeps
the head weight in the model dtype, so an fp32 weight the trainer sends would be rounded
to bf16 first; the copy here keeps it exact, and works on 0.24 too.

On a GPU with a bf16 body the fp32 matmul (no tensor cores) costs ~1 ms per decode
step at batch 256 and a 151936-word vocabulary. Measured on an H100 (vLLM 0.24, a
0.5B Qwen2 shape, 256 x 512 tokens; bench/results/rollout_h100.md) that cost hid under
the engine's per-step CPU work (it looks CPU-bound at this size): -4.1% and +0.7%
throughput in two runs, within the run-to-run noise. For GPU-bound settings there is
"split3": since the hidden state is
exactly bf16-representable, the fp32 weight is stored as the sum of three bf16 tensors
(hi + mid + lo carry all 24 mantissa bits) and one bf16 tensor-core GEMM over
[h, h, h] x [hi | mid | lo] accumulates in fp32 with fp32 output: every product is
exact in fp32, so the logits agree with the fp32 matmul to fp32 rounding. It was not
faster in the CPU-bound runs measured, so "auto" means "exact" (plain fp32 F.linear).

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


HEAD_IMPLS = ("auto", "exact", "split3")


def split3(weight: torch.Tensor) -> torch.Tensor:
    """[rows, H] fp32 -> [rows, 3H] bf16 = [hi | mid | lo] with hi + mid + lo == weight
    (to within 2^-24 relative: three 8-bit mantissas cover fp32's 24)."""
    w = weight.float()
    hi = w.to(torch.bfloat16)
    r = w - hi.float()
    mid = r.to(torch.bfloat16)
    lo = (r - mid.float()).to(torch.bfloat16)
    return torch.cat([hi, mid, lo], dim=1).contiguous()


def split3_linear(hidden: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """fp32 logits of bf16 hidden states against a split3 weight, on tensor cores
    (torch.mm with out_dtype=float32 exists for CUDA only)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.mm(torch.cat([flat, flat, flat], dim=1), w3.t(), out_dtype=torch.float32)
    return out.reshape(*hidden.shape[:-1], -1)


def _split3_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 3, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except Exception:
        return False


class Fp32Head:
    """An fp32 copy of one rank's LM-head shard and the `compute_logits` that uses it."""

    def __init__(self, model: torch.nn.Module, full_weight: torch.Tensor | None = None, impl: str = "auto"):
        self.model = model
        self.head = compat.lm_head(model)
        self.rows = compat.head_shard_rows(self.head)
        live = self.head.weight
        self.weight = torch.zeros(live.shape, dtype=torch.float32, device=live.device)
        bias = compat.head_bias(self.head)
        self.bias = bias.detach().float().clone() if bias is not None else None
        self.impl = self._resolve(impl)
        self.w3: torch.Tensor | None = None
        if full_weight is not None and full_weight.dtype == torch.float32:
            self.set_rows(full_weight)
        else:
            self.refresh()

    def _resolve(self, impl: str) -> str:
        if impl not in HEAD_IMPLS:
            raise ValueError(f"FP32 head implementation {impl!r} is unknown; allowed: {', '.join(HEAD_IMPLS)}")
        live = self.head.weight
        if impl == "split3" and not (live.dtype == torch.bfloat16 and _split3_available(live.device)):
            return "exact"  # needs a bf16 body and CUDA's torch.mm(..., out_dtype=float32)
        return "exact" if impl == "auto" else impl

    def set_impl(self, impl: str) -> None:
        self.impl = self._resolve(impl)
        self.w3 = None
        self._derive()

    def refresh(self) -> None:
        """Re-derive the copy from the live head (after a load in the model dtype)."""
        self.weight.copy_(self.head.weight.detach().float())
        if self.bias is not None:
            self.bias.copy_(compat.head_bias(self.head).detach().float())
        self._derive()

    def _derive(self) -> None:
        if self.impl == "split3":
            self.w3 = split3(self.weight)

    def move(self, device: torch.device | str) -> None:
        """Move the fp32 copy (not part of vLLM's sleep-managed memory) off the GPU while
        the engine sleeps, and back when it wakes."""
        self.weight = self.weight.to(device)
        if self.bias is not None:
            self.bias = self.bias.to(device)
        self.w3 = None if self.w3 is None else self.w3.to(device)

    def set_rows(self, full_weight: torch.Tensor) -> None:
        """Take this rank's rows from the full [vocab, hidden] head weight, exactly."""
        start, end = self.rows
        self.weight[: end - start].copy_(full_weight[start:end].to(self.weight.device, torch.float32))
        self._derive()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.w3 is not None and hidden_states.dtype == torch.bfloat16:
            local = split3_linear(hidden_states, self.w3)
            if self.bias is not None:
                local = local + self.bias
        else:
            local = F.linear(hidden_states.float(), self.weight, self.bias)
        return compat.finish_logits(self.model, local)
