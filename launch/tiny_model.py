"""Tiny models made locally (random init + a character tokenizer): Qwen2 presets, and a
MiniMax-M1-shaped hybrid (lightning + softmax attention, MoE feed-forward).

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
# MiniMax-M1's layout at toy size: 7 lightning-attention layers per softmax layer, a
# mixture of experts in every layer (top-2 of 4). block_size 16 (transformers' lightning
# attention block) makes short prompts span several blocks. The residual factors follow
# MiniMax-Text-01's alpha = (2 * layers) ** 0.25 on the residual branch.
MINIMAX_PRESETS: dict[str, dict] = {
    "minimax-tiny": dict(
        hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        layer_types=["linear_attention"] * 7 + ["full_attention"], intermediate_size=256,
        num_local_experts=4, num_experts_per_tok=2, block_size=16,
        full_attn_alpha_factor=2.0, linear_attn_alpha_factor=2.0, mlp_alpha_factor=2.0,
    ),
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
    return _write(path, Qwen2ForCausalLM, config, tokenizer, seed)


def _write(path: Path, model_cls, config, tokenizer, seed: int) -> Path:
    """A randomly initialised `model_cls(config)` and the tokenizer, saved to `path`."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_minimax(path: str | os.PathLike, preset: str = "minimax-tiny", seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised transformers `MiniMaxForCausalLM` (hybrid lightning /
    softmax attention, MoE) with the char tokenizer to `path`."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    if preset not in MINIMAX_PRESETS:
        raise ValueError(f"unknown MiniMax preset {preset!r}; allowed: {', '.join(MINIMAX_PRESETS)}")
    path = Path(path)
    tokenizer = build_char_tokenizer()
    config = MiniMaxConfig(**{
        "vocab_size": len(tokenizer),  # an override may make it larger (ids past the tokenizer's never decode)
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **MINIMAX_PRESETS[preset],
        **overrides,
    })
    return _write(path, MiniMaxForCausalLM, config, tokenizer, seed)


def make_builtin(path: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """Any built-in preset, by name."""
    if preset in MINIMAX_PRESETS:
        return make_tiny_minimax(path, preset, seed)
    if preset in PRESETS:
        return make_tiny_qwen2(path, preset, seed)
    raise ValueError(f"unknown built-in model {preset!r}; allowed: {', '.join([*PRESETS, *MINIMAX_PRESETS])}")


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
        make_builtin(tmp, preset)
        tmp.rename(target)  # atomic: concurrent runs never see half a model
    return str(target)
