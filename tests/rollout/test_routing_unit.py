"""The routing record's bookkeeping (rollout/routing.py) without an engine: each forward's
expert ids are filed under the right request and position, through reordering, and come
back as one [tokens, layers, top_k] record per request."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from rollout import routing  # noqa: E402


def _params(tag):
    return SimpleNamespace(extra_args=routing.request_args(tag) if tag else None)


def _step(ids_per_layer, positions, qsl):
    routing.note_step([torch.tensor(x, dtype=torch.int32) for x in ids_per_layer], torch.tensor(positions),
                      torch.tensor(qsl))


def test_steps_are_filed_per_request_and_position():
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    rec = routing.RoutingRecorder(None, torch.device("cpu"), False)
    # step 1: prefill of a (3 tokens), an untagged request (1 token), prefill of b (2 tokens)
    rec.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                 added=[(0, _params("a"), [], []), (1, _params(None), [], []), (2, _params("b"), [], [])]))
    layer0 = [[0, 1], [1, 2], [2, 3], [9, 9], [3, 0], [0, 2]]
    layer1 = [[1, 0], [2, 1], [3, 2], [9, 9], [0, 3], [2, 0]]
    _step([layer0, layer1], [0, 1, 2, 0, 0, 1], [0, 3, 4, 6])
    logits = torch.zeros(3, 5)
    assert rec.apply(logits) is logits  # it changes nothing
    rec.apply(logits)  # a second call without a new forward files nothing twice
    # step 2: the untagged request left, b moved into its row, then a and b swapped (decode: one token each)
    moves = [(2, 1, MoveDirectionality.UNIDIRECTIONAL), (0, 1, MoveDirectionality.SWAP)]
    rec.update_state(BatchUpdate(batch_size=2, removed=[1], added=[], moved=moves))
    _step([[[1, 3], [2, 3]], [[3, 1], [0, 1]]], [2, 3], [0, 1, 2])
    rec.apply(torch.zeros(2, 5))

    a = routing.take("a", 5)
    assert a.shape == (5, 2, 2) and a.dtype == torch.int16
    assert a[:3, 0].tolist() == layer0[:3] and a[:3, 1].tolist() == layer1[:3]
    assert a[3].tolist() == [[2, 3], [0, 1]]  # its decode token, at position 3, from row 1 of step 2
    assert (a[4] == -1).all()  # never run through the model
    b = routing.take("b", 3)
    assert b[:2, 0].tolist() == layer0[4:] and b[2].tolist() == [[1, 3], [3, 1]]
    assert routing.take("a", 5) is None  # taken once
    with pytest.raises(ValueError, match="string tag"):
        routing.RoutingRecorder.validate_params(SimpleNamespace(extra_args={routing.REQUEST_KEY: 3}))
