"""Tiny Qwen2-architecture models made locally (random init + a character tokenizer).

Hubs cannot be reached from every machine, and tests and the embedded default run
need a real Hugging Face model folder that `transformers`, vLLM and DeepSpeed all
load through their ordinary code paths. This writes one: config.json, safetensors
weights and a `tokenizers` tokenizer with a chat template.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# head_dim must be >= 64 for vLLM's CPU attention backend.
PRESETS: dict[str, dict[str, int]] = {
    "tiny-qwen2": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256),
    "small-qwen2": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
    # ~25M parameters: the GPU size of the reasoning recipe (conf/experiment/long_addition_gpu.yaml)
    "base-qwen2": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1536),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (every char is one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_qwen2(path: str | os.PathLike, preset: str = "tiny-qwen2", seed: int = 0, **overrides: int) -> Path:
    """Write a randomly initialised Qwen2 model with the char tokenizer to `path`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; allowed: {', '.join(PRESETS)}")
    path = Path(path)
    tokenizer = build_char_tokenizer()
    shape = {**PRESETS[preset], **overrides}
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("CISPO_CACHE", Path.home() / ".cache" / "cispo")) / "models"


def resolve_model_path(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """`builtin:<preset>` -> a cached local folder (made on first use); anything else as is."""
    if not spec.startswith("builtin:"):
        return spec
    preset = spec.split(":", 1)[1]
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    target = folder / preset
    if not (target / "config.json").exists():
        tmp = folder / f".{preset}.tmp{os.getpid()}"
        make_tiny_qwen2(tmp, preset=preset)
        tmp.rename(target)  # atomic: concurrent runs never see half a model
    return str(target)
