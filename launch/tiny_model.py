"""Tiny models made locally (random init + a character tokenizer): Qwen2 presets, and a
MiniMax-M1-shaped hybrid (lightning + softmax attention, MoE feed-forward).

Hubs cannot be reached from every machine, and tests and the embedded default run
need a real Hugging Face model folder that `transformers`, vLLM and DeepSpeed all
load through their ordinary code paths. This writes one: config.json, safetensors
weights and a `tokenizers` tokenizer with a chat template.
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# head_dim must be >= 64 for vLLM's CPU attention backend.
PRESETS: dict[str, dict[str, int]] = {
    "tiny-qwen2": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256),
    "small-qwen2": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
    # ~25M parameters: the GPU size of the reasoning recipe (conf/experiment/long_addition_gpu.yaml)
    "base-qwen2": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1536),
    # The shapes of the public Qwen2 checkpoints, randomly initialised (GPU measurements, no hub):
    # bf16 on disk, the char tokenizer padded with filler tokens up to the vocabulary.
    "qwen2-0.5b-shape": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b-shape": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                             intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-3b-shape": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                           intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b-shape": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
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


def build_char_tokenizer(vocab_size: int | None = None):
    """A character-level fast tokenizer over printable ASCII (every char is one token),
    padded with filler tokens '<x_N>' up to `vocab_size` so every id a bigger model can
    sample decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<x_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_qwen2(path: str | os.PathLike, preset: str = "tiny-qwen2", seed: int = 0, weights: bool = True,
                    device: str = "cpu", **overrides: int) -> Path:
    """Write a randomly initialised Qwen2 model with the char tokenizer to `path`.
    weights=False writes only config and tokenizer (for vLLM's load_format="dummy");
    device="cuda" initialises there (seconds instead of a minute for 1.5B)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; allowed: {', '.join(PRESETS)}")
    shape = {"tie_word_embeddings": False, **PRESETS[preset], **overrides}
    big = "vocab_size" in shape  # the Qwen2 shapes: bf16, rope base and eps as published
    tokenizer = build_char_tokenizer(shape.get("vocab_size"))
    shape.setdefault("vocab_size", len(tokenizer))
    config = Qwen2Config(
        max_position_embeddings=4096 if big else 2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16" if big else "float32",
        **({"rope_theta": 1000000.0, "rms_norm_eps": 1e-6} if big else {}),
        **shape,
    )
    return _write(Path(path), Qwen2ForCausalLM, config, tokenizer, seed, weights=weights, device=device,
                  bf16=big)


def _write(path: Path, model_cls, config, tokenizer, seed: int, weights: bool = True, device: str = "cpu",
           bf16: bool = False) -> Path:
    """A randomly initialised `model_cls(config)` and the tokenizer, saved to `path`."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    if not weights:
        config.save_pretrained(path)
        return path
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_folder(path: str) -> None:
    """Fail before anything starts when a local model folder lacks what every part loads:
    config.json, weights, and a tokenizer (the driver, vLLM and the rewards all decode).
    A path that is not a local folder (a hub name) is left to transformers."""
    from cispo.config import ConfigError

    folder = Path(path)
    if not folder.is_dir():
        if folder.exists():
            raise ConfigError("model.path", f"{path} is a file; give a Hugging Face model folder")
        return
    if not (folder / "config.json").exists():
        raise ConfigError("model.path", f"{path} has no config.json: not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError("model.path", f"{path} has no weights (*.safetensors or *.bin)")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError("model.path", f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save "
                          "one beside the weights (tokenizer.save_pretrained(folder)) or point model.path at a "
                          "folder that has one")


def make_tiny_minimax(path: str | os.PathLike, preset: str = "minimax-tiny", seed: int = 0, device: str = "cpu",
                      **overrides) -> Path:
    """Write a randomly initialised transformers `MiniMaxForCausalLM` (hybrid lightning /
    softmax attention, MoE) with the char tokenizer to `path`."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    if preset not in MINIMAX_PRESETS:
        raise ValueError(f"unknown MiniMax preset {preset!r}; allowed: {', '.join(MINIMAX_PRESETS)}")
    tokenizer = build_char_tokenizer()
    config = MiniMaxConfig(**{
        "vocab_size": len(tokenizer),  # an override may make it larger (ids past the tokenizer's never decode)
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # no padding_idx: it would make <pad>'s embedding a zero vector (and keep it one). A random
        # policy samples <pad> now and then, and in MiniMax's post-norm layers a zero hidden state
        # stays zero through every layer, where each RMSNorm's backward multiplies the gradient by
        # 1/sqrt(eps) ~ 316: two per layer overflowed fp32 by layer 0 (the NaN gradients of
        # docs/minimax.md). Real models' pad embeddings are trained vectors, not zeros.
        "pad_token_id": None,
        **MINIMAX_PRESETS[preset],
        **overrides,
    })
    return _write(Path(path), MiniMaxForCausalLM, config, tokenizer, seed, device=device)


# a preset whose weights changed gets a new cache folder (an old cache keeps the old model otherwise)
BUILTIN_REVISIONS = {"minimax-tiny": 2}  # r2: <pad> has a random embedding, not zeros


def make_builtin(path: str | os.PathLike, preset: str, seed: int = 0, device: str = "cpu") -> Path:
    """Any built-in preset, by name."""
    if preset in MINIMAX_PRESETS:
        return make_tiny_minimax(path, preset, seed, device=device)
    if preset in PRESETS:
        return make_tiny_qwen2(path, preset, seed, device=device)
    raise ValueError(f"unknown built-in model {preset!r}; allowed: {', '.join([*PRESETS, *MINIMAX_PRESETS])}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("CISPO_CACHE", Path.home() / ".cache" / "cispo")) / "models"


def resolve_model_path(spec: str, cache_dir: str | os.PathLike | None = None, device: str = "cpu") -> str:
    """`builtin:<preset>` -> a cached local folder (made on first use); anything else as is."""
    if not spec.startswith("builtin:"):
        return spec
    preset = spec.split(":", 1)[1]
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    target = folder / (f"{preset}.r{BUILTIN_REVISIONS[preset]}" if preset in BUILTIN_REVISIONS else preset)
    if not (target / "config.json").exists():
        tmp = folder / f".{preset}.tmp{os.getpid()}"
        make_builtin(tmp, preset, device=device)
        try:
            tmp.rename(target)  # atomic: concurrent runs never see half a model
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run made it first: the same model
    return str(target)


def main() -> None:
    """`python -m launch.tiny_model [--device cuda] PRESET ...`: make the presets' folders in
    the cache `model.path=builtin:PRESET` reads (ahead of a GPU run, so the driver process
    never initialises a model on a GPU itself)."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("presets", nargs="+", choices=sorted([*PRESETS, *MINIMAX_PRESETS]))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    for preset in args.presets:
        t0 = time.perf_counter()
        path = resolve_model_path(f"builtin:{preset}", device=args.device)
        print(f"{preset}: {path} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
