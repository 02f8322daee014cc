"""Methods vLLM mixes into its worker class (`worker_extension_cls`), called through
`LLM.collective_rpc` on every tensor-parallel worker of an engine.

They run where the model lives (the actor's own process with the in-process engine at
TP=1; vLLM's worker processes at TP>1), so weights never cross a process boundary
twice. Every touch of vLLM internals goes through `rollout.vllm_compat`.
"""

from __future__ import annotations

import time
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
    def _cispo_load(self, named: Iterable[tuple[str, torch.Tensor]], metas: list | None = None) -> int:
        """Reload weights in place; refresh the fp32 head copy from what came in. metas:
        the tensors' names and shapes up front (a bucket plan), which the copy path needs."""
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
        t0 = time.perf_counter()
        how = compat.load_weights_inplace(self, tap(named), getattr(self, "_cispo_weight_load", "auto"), metas)
        t1 = time.perf_counter()
        head = getattr(self, "_cispo_head", None)
        if head is not None and seen["head_any"]:
            if seen["head32"] is not None:
                head.set_rows(seen["head32"])
            else:
                head.refresh()
        self._cispo_sync()
        # load_s includes the time the loader spent waiting on the incoming stream
        self._cispo_stats = {"load_path": how, "tensors": seen["count"], "load_s": t1 - t0,
                             "head_refresh_s": time.perf_counter() - t1}
        return seen["count"]

    def _cispo_sync(self) -> None:
        if compat.worker_device(self).type == "cuda":
            torch.cuda.synchronize()

    def cispo_set_weight_load(self, how: str) -> None:
        self._cispo_weight_load = how

    def cispo_load_weights(self, weights: Any) -> int:
        return self._cispo_load(decode_weights(weights))

    def cispo_last_load_stats(self) -> dict[str, Any]:
        """Where the last weight load spent its time (seconds) and which path it took."""
        return dict(getattr(self, "_cispo_stats", {}))

    # ----------------------------------------------------------------- colocated (CUDA IPC)
    def cispo_receive_ipc(self, items: list[tuple[list[weight_sync.ParamMeta], tuple]]) -> int:
        """Load buckets a colocated trainer rank shared by CUDA IPC (`weight_sync.share_bucket`):
        the tensors are the sender's memory mapped here, read once by the loader."""
        t0 = time.perf_counter()
        opened = [(bucket, weight_sync.open_bucket(handle)) for bucket, handle in items]
        t1 = time.perf_counter()
        count = self._cispo_load((item for bucket, flat in opened for item in weight_sync.unflatten_bucket(flat, bucket)),
                                 [m for bucket, _ in items for m in bucket])
        del opened  # the sender frees its buckets once every engine returned
        self._cispo_stats.update(open_s=t1 - t0, total_s=time.perf_counter() - t0)
        return count

    # ----------------------------------------------------------------- sleep / wake
    def cispo_head_to(self, where: str) -> None:
        """The fp32 head copy lives outside vLLM's sleep-managed memory: move it to CPU
        before sleep ("cpu") and back after waking ("device")."""
        head = getattr(self, "_cispo_head", None)
        if head is not None:
            head.move("cpu" if where == "cpu" else compat.worker_device(self))

    def cispo_release_cached(self) -> None:
        """Hand the blocks torch's caching allocator keeps in this process (the moved head
        copy, generation's activations) back to the device, for the colocated trainer."""
        if compat.worker_device(self).type == "cuda":
            torch.cuda.empty_cache()

    def cispo_free_memory(self) -> tuple[int, int]:
        return compat.device_free_memory(self)

    # ----------------------------------------------------------------- checks
    def cispo_checksums(self, rows: dict[str, int] | None = None) -> dict[str, int]:
        """`weight_sync.checksum` of every parameter as vLLM holds it (fused names such as
        qkv_proj, gate_up_proj), and of the fp32 head copy as "cispo.fp32_head". rows:
        keep only the first n rows of the named tensors (vocabulary padding)."""
        rows = rows or {}
        out = {name: weight_sync.checksum(p[: rows[name]] if name in rows else p)
               for name, p in compat.worker_model(self).named_parameters()}
        head = getattr(self, "_cispo_head", None)
        if head is not None:
            start, end = head.rows
            out["cispo.fp32_head"] = weight_sync.checksum(head.weight[: end - start])
        return out

    # ----------------------------------------------------------------- collective sync
    def cispo_init_sync(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> int:
        """Join the trainer's weight-sync group. An engine of tensor-parallel size P holds
        P consecutive ranks starting at `rank` (one per worker)."""
        tp_rank, _ = compat.tp_rank_and_size()
        my_rank = rank + tp_rank
        self._cispo_sync_group = weight_sync.create_sync_group(backend, host, port, my_rank, world_size, timeout_s)
        self._cispo_sync_device = compat.worker_device(self) if backend == "nccl" else torch.device("cpu")
        return my_rank

    def cispo_receive(self, plan: list[list[weight_sync.ParamMeta]], timed: bool = False) -> int:
        """Receive the plan's buckets from sync rank 0 and load them. timed: wait for each
        bucket to arrive before loading it, so receive_s and load_s split the total (costs
        the overlap; for measurements)."""
        group = getattr(self, "_cispo_sync_group", None)
        if group is None:
            raise RuntimeError("receive_weights called before init_weight_sync: this worker is in no sync group")
        device = self._cispo_sync_device

        recv = {"s": 0.0}
        t0 = time.perf_counter()

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            # Buckets are received lazily as the loader asks for the next tensor, so at
            # most one bucket (plus what the loader holds) is in flight.
            for bucket in plan:
                t = time.perf_counter()
                flat = weight_sync.empty_bucket(bucket, device)
                weight_sync.broadcast_bucket(group, flat)
                if timed and flat.is_cuda:
                    torch.cuda.current_stream().synchronize()  # the bucket is here: time it as transfer
                recv["s"] += time.perf_counter() - t
                yield from weight_sync.unflatten_bucket(flat, bucket)

        gen = stream()
        try:
            count = self._cispo_load(gen, [m for bucket in plan for m in bucket])
        except weight_sync.SyncAborted:
            self._cispo_sync_group = None  # unusable: the sender rebuilds the group and resends
            raise
        finally:
            # If loading stopped early (an error), still take part in the remaining
            # broadcasts so the sender and the other receivers are not left hanging.
            for _ in gen:
                pass
        stats = self._cispo_stats
        stats.update(total_s=time.perf_counter() - t0, buckets=len(plan))
        if timed:  # otherwise load_s includes the waits for the incoming buckets
            stats.update(receive_s=recv["s"], load_s=stats["load_s"] - recv["s"])
        return count

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
