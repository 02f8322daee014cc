"""Run by test_clean_exit.py in a fresh interpreter: a 2-rank group trains, saves or
resumes, writes its final weights, and shuts down. Usage:

    python exit_resume_script.py MODEL CKPT_ROOT OUT.pt {uninterrupted|resume} RAY_TMP
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import ray
    import torch

    from cispo.config import AlgorithmConfig, TrainerConfig
    from launch.cluster import no_idle_workers
    from tests.trainer.helpers import random_trajectories
    from trainer import TrainerGroup

    model, root, out, mode, ray_tmp = sys.argv[1:6]
    trajs = random_trajectories(6, vocab=90, seed=11)
    g = torch.Generator().manual_seed(0)
    for t in trajs:
        t.rollout_logprobs = (-4.0 + torch.randn(len(t.response_ids), generator=g)).tolist()
    cfg = TrainerConfig(num_ranks=2, zero_stage=2, lr=1e-3, warmup_steps=3, micro_batch_tokens=32,
                        mini_batch_size=3, epochs=2)
    no_idle_workers()  # the abort check then reads only our actors' output
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp)
    group = TrainerGroup(model, cfg, AlgorithmConfig(), num_ranks=2, temperature=0.9)
    if mode == "uninterrupted":
        group.train_step(copy.deepcopy(trajs))
        group.save_checkpoint(root)
    else:
        assert group.load_checkpoint(root) == 1
    group.train_step(copy.deepcopy(trajs))
    torch.save(group.state_dict(), out)
    group.shutdown()
    ray.shutdown()
    print("EXIT_SCRIPT_DONE", flush=True)
