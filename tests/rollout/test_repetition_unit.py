"""Repetition-stop bookkeeping without an engine (milliseconds)."""

import math

import pytest
import torch

from rollout.repetition import RepetitionState, request_args, step_stats


def test_step_stats_matches_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 4
    temps = torch.tensor([1.0, 0.5, 2.0, 0.7, 1.3])
    arg, pmax = step_stats(logits, temps)
    probs = torch.softmax(logits / temps[:, None], -1)
    assert torch.equal(arg, probs.argmax(-1))
    assert torch.allclose(pmax, probs.max(-1).values, atol=1e-6)


def _run(tokens, stats, window=3, prob=0.99):
    out: list[int] = []
    st = RepetitionState(window, prob, eos=0, tag="t", temperature=1.0, out=out)
    streaks = []
    for tok, (arg, p) in zip(tokens, stats):
        st.note(len(out), arg, p)  # what apply() records before the token is sampled
        out.append(tok)
        streaks.append(st.advance())
    return streaks


def test_streak_counts_only_confident_sampled_tokens():
    toks = [5, 5, 5, 7, 5, 5, 5]
    stats = [(5, 0.999), (5, 0.999), (5, 0.999), (5, 0.999), (5, 0.999), (5, 0.98), (5, 0.999)]
    # token 7 was not the confident argmax -> reset; 0.98 <= p -> reset
    assert _run(toks, stats) == [1, 2, 3, 0, 1, 0, 1]


def test_placeholder_tokens_wait():
    out = [5, -1]
    st = RepetitionState(2, 0.99, 0, "t", 1.0, out)
    st.note(0, 5, 0.999)
    st.note(1, 5, 0.999)
    assert st.advance() == 1  # position 1 is an async placeholder: not judged yet
    out[1] = 5
    assert st.advance() == 2 and st.fired


def test_request_args_validate():
    assert request_args(3000, 0.99, 2, "x")["cispo_repetition"]["window"] == 3000
    with pytest.raises(ValueError):
        request_args(10, 0.3, 2, "x")  # p < 0.5: argmax no longer decides
    assert math.isclose(request_args(10, 0.5, 2, "x")["cispo_repetition"]["prob"], 0.5)
