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


def test_routed_experts_are_packed_and_checked():
    a = Trajectory([1, 2], [3], [-0.1], "stop", 0, routed_experts=torch.arange(12, dtype=torch.int16).view(3, 2, 2))
    b = Trajectory([4], [5], [-0.2], "stop", 0)  # no record: its rows are -1 (routed live)
    p = pack([a, b])
    assert p.routed_experts.shape == (5, 2, 2) and p.routed_experts.dtype == torch.int16
    assert torch.equal(p.routed_experts[:3], a.routed_experts)
    assert (p.routed_experts[3:] == -1).all()
    assert pack([b]).routed_experts is None
    assert p.to("cpu").routed_experts is not None and pack([b]).to("cpu").routed_experts is None
    with pytest.raises(ValueError, match=r"routed_experts has shape \(2, 2, 2\); expected \[3"):
        Trajectory([1, 2], [3], [-0.1], "stop", 0, routed_experts=torch.zeros(2, 2, 2, dtype=torch.int16))
    c = Trajectory([1], [2], [-0.1], "stop", 0, routed_experts=torch.zeros(2, 3, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match="disagree in"):
        pack([a, c])
