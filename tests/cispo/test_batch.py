import pytest
import torch

from cispo.batch import Trajectory, pack


def test_pack_aligns_targets_masks_and_logprobs():
    a = Trajectory([1, 2, 3], [4, 5], [-0.5, -0.25], "stop", policy_version=3, advantage=2.0)
    b = Trajectory([6], [7, 8, 9], [-1.0, -2.0, -3.0], "length", policy_version=3, advantage=-1.0,
                   response_mask=[True, False, True])
    p = pack([a, b])
    assert p.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert p.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert p.cu_seqlens.tolist() == [0, 5, 9]
    assert p.targets.tolist() == [2, 3, 4, 5, 0, 7, 8, 9, 0]
    assert p.loss_mask.tolist() == [False, False, True, True, False, True, False, True, False]
    assert p.old_logprobs[p.loss_mask].tolist() == [-0.5, -0.25, -1.0, -3.0]
    assert p.advantages[p.loss_mask].tolist() == [2.0, 2.0, -1.0, -1.0]
    assert p.seq_index.tolist() == [0] * 5 + [1] * 4
    assert p.num_loss_tokens == 4 and p.num_seqs == 2


def test_trajectory_rejects_inconsistent_input_with_named_field():
    with pytest.raises(ValueError, match="rollout_logprobs has 1 entries but response_ids has 2"):
        Trajectory([1], [2, 3], [-0.1], "stop", 0)
    with pytest.raises(ValueError, match="finish_reason='eos'"):
        Trajectory([1], [2], [-0.1], "eos", 0)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Trajectory([], [2], [-0.1], "stop", 0)
