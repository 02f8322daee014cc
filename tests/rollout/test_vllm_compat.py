"""The vLLM surface `rollout/` depends on, checked against the installed release
(so a vLLM upgrade that moves something fails here, naming the function)."""

import inspect
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from rollout import vllm_compat as compat  # noqa: E402


def test_engine_kwargs_are_engine_args():
    from vllm.engine.arg_utils import EngineArgs

    from rollout.repetition import RepetitionStopProcessor

    kw = compat.engine_kwargs(
        "/nonexistent", dtype="bfloat16", tensor_parallel_size=1, gpu_memory_utilization=0.2,
        max_model_len=256, seed=0, logits_processors=[RepetitionStopProcessor], enforce_eager=True,
    )
    fields = set(inspect.signature(EngineArgs).parameters)
    assert set(kw) <= fields, set(kw) - fields
    assert kw["logprobs_mode"] == "processed_logprobs"


def test_sampling_params_build():
    sp = compat.sampling_params(
        temperature=0.7, top_p=1.0, top_k=-1, max_tokens=8, stop=None, ignore_eos=False,
        detokenize=False, seed=None, extra_args={"cispo_repetition": {"window": 4, "prob": 0.99, "eos": 2, "tag": "a"}},
    )
    assert sp.logprobs == 0 and sp.extra_args["cispo_repetition"]["window"] == 4


def test_logits_processor_interface():
    base = compat.logits_processor_base()
    for name in ("__init__", "apply", "is_argmax_invariant", "update_state", "validate_params"):
        assert hasattr(base, name)
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    params = SimpleNamespace(extra_args=None)
    bu = BatchUpdate(batch_size=3, removed=[1], added=[(2, params, [0], [5])], moved=[(0, 1, MoveDirectionality.SWAP)])
    removed, added, moved = compat.batch_update_ops(bu)
    assert removed == [1] and added == [(2, params, [5])] and moved == [(0, 1, True)]
    assert compat.batch_update_ops(None) == ([], [], [])


def test_parse_completion():
    from vllm.logprobs import Logprob

    out = SimpleNamespace(
        token_ids=[4, 9], logprobs=[{4: Logprob(-0.5)}, {9: Logprob(-1.25), 3: Logprob(-0.1)}],
        finish_reason="length", stop_reason=None,
    )
    assert compat.parse_completion(out) == ([4, 9], [-0.5, -1.25], "length", None)

