"""Methods vLLM mixes into its worker class (`worker_extension_cls`), called through
`LLM.collective_rpc` on every tensor-parallel worker of an engine.

They run where the model lives (the actor's own process with the in-process engine at
TP=1; vLLM's worker processes at TP>1), so weights never cross a process boundary
twice. Every touch of vLLM internals goes through `rollout.vllm_compat`.
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Iterator

import torch

from cispo import weight_sync
from rollout import vllm_compat as compat
from rollout.fp32_head import Fp32Head, head_source_names, read_checkpoint_tensor


def decode_weights(weights: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """Named tensors from any of the object-store forms `RolloutEngine.update_weights`
    accepts: a dict or list of (name, tensor); safetensors bytes; or a list of
    (bucket plan, flat tensor) pairs built with `cispo.weight_sync`."""
    if isinstance(weights, (bytes, bytearray)):
        from safetensors.torch import load

        return load(bytes(weights)).items()
    if isinstance(weights, dict):
        return weights.items()
    weights = list(weights)
    if weights and isinstance(weights[0], (tuple, list)) and isinstance(weights[0][0], list):
        return (item for bucket, flat in weights for item in weight_sync.unflatten_bucket(flat, bucket))
    return weights


def encode_weights(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """safetensors bytes: what crosses a process boundary that does not carry tensors."""
    from safetensors.torch import save

    return save({n: t.detach().contiguous().cpu() for n, t in named})


class CispoWorkerExtension:
    # ----------------------------------------------------------------- FP32 head
    def cispo_set_fp32_head(self, enabled: bool, model_path: str | None = None, impl: str = "auto") -> str | None:
        """Install (or remove) the FP32 head; returns the implementation in use.

        The fp32 copy, once made, is kept (and refreshed by every weight load) while
        the head is switched off, so switching back on never serves stale weights. It
        is first made from the checkpoint's own tensor (full precision) unless weights
        were loaded since start-up, then from the live head."""
        model = compat.worker_model(self)
        head = getattr(self, "_cispo_head", None)
        if head is None and enabled:
            full = None
            if model_path is not None and not getattr(self, "_cispo_updated", False):
                full = read_checkpoint_tensor(model_path, head_source_names(compat.tied_word_embeddings(model)))
            head = self._cispo_head = Fp32Head(model, full, impl)
        elif head is not None and impl != "auto" and impl != head.impl:
            head.set_impl(impl)
        compat.set_compute_logits(model, head.compute_logits if enabled else None)
        return head.impl if enabled else None

    def cispo_fp32_head_weight(self) -> torch.Tensor | None:
        """This rank's fp32 head shard (for tests and diagnostics)."""
        head = getattr(self, "_cispo_head", None)
        return None if head is None else head.weight.detach().cpu().clone()

    # ----------------------------------------------------------------- weights
    def _cispo_load(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload weights in place; refresh the fp32 head copy from what came in."""
        model = compat.worker_model(self)
        head_names = head_source_names(compat.tied_word_embeddings(model))
        seen = {"count": 0, "head32": None, "head_any": False}

        def tap(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                seen["count"] += 1
                if name in head_names:
                    seen["head_any"] = True
                    if tensor.dtype == torch.float32 and seen["head32"] is None:
                        seen["head32"] = tensor.detach().clone()
                yield name, tensor

        self._cispo_updated = True
        compat.reload_weights(self, tap(named))
        head = getattr(self, "_cispo_head", None)
        if head is not None and seen["head_any"]:
            if seen["head32"] is not None:
                head.set_rows(seen["head32"])
            else:
                head.refresh()
        return seen["count"]

    def cispo_load_weights(self, weights: Any) -> int:
        return self._cispo_load(decode_weights(weights))

    # ----------------------------------------------------------------- collective sync
    def cispo_init_sync(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> int:
        """Join the trainer's weight-sync group. An engine of tensor-parallel size P holds
        P consecutive ranks starting at `rank` (one per worker)."""
        tp_rank, _ = compat.tp_rank_and_size()
        my_rank = rank + tp_rank
        self._cispo_sync_group = weight_sync.create_sync_group(backend, host, port, my_rank, world_size, timeout_s)
        self._cispo_sync_device = compat.worker_device(self) if backend == "nccl" else torch.device("cpu")
        return my_rank

    def cispo_receive(self, plan: list[list[weight_sync.ParamMeta]]) -> int:
        group = getattr(self, "_cispo_sync_group", None)
        if group is None:
            raise RuntimeError("receive_weights called before init_weight_sync: this worker is in no sync group")
        device = self._cispo_sync_device

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            # Buckets are received lazily as the loader asks for the next tensor, so at
            # most one bucket (plus what the loader holds) is in flight.
            for bucket in plan:
                flat = weight_sync.empty_bucket(bucket, device)
                weight_sync.broadcast_bucket(group, flat)
                yield from weight_sync.unflatten_bucket(flat, bucket)

        gen = stream()
        try:
            return self._cispo_load(gen)
        finally:
            # If loading stopped early (an error), still take part in the remaining
            # broadcasts so the sender and the other receivers are not left hanging.
            for _ in gen:
                pass

    # ----------------------------------------------------------------- routing replay
    def cispo_take_routing(self, wanted: list[tuple[str, int]]) -> list[torch.Tensor | None]:
        """The recorded expert ids of finished requests, [tokens, layers, top_k] each
        (rollout.routing), removed from this worker's store."""
        from rollout import routing

        return [routing.take(tag, length) for tag, length in wanted]

    def cispo_probe(self) -> dict[str, Any]:
        """The vLLM internals this extension relies on, as seen in the live worker."""
        import inspect

        model = compat.worker_model(self)
        head = compat.lm_head(model)
        lp = model.logits_processor
        return {
            "model": type(model).__name__,
            "lm_head": type(head).__name__,
            "head_rows": compat.head_shard_rows(head),
            "head_dtype": str(head.weight.dtype),
            "tp": compat.tp_rank_and_size(),
            "logits_processor_ok": all(hasattr(lp, a) for a in ("org_vocab_size", "soft_cap", "scale", "_gather_logits")),
            "reload_weights_ok": "weights_iterator" in inspect.signature(self.reload_weights).parameters
            or "kwargs" in inspect.signature(self.reload_weights).parameters,
            "fp32_head_installed": "compute_logits" in model.__dict__,
            "pid": __import__("os").getpid(),
        }
