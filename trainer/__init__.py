"""DeepSpeed trainer ranks in Ray actors applying CISPO with an FP32 LM head.

Public API (see each module):
  TrainerGroup   (trainer.group)   the driver's handle: train_step, checkpoints, HF export, weights out
  TrainerWorker  (trainer.worker)  one rank (a Ray actor inside the group, or in-process)
  head_logprobs  (trainer.fp32_head) chunked FP32 LM-head log-probs/entropy with gradients
"""

from trainer.fp32_head import head_logprobs
from trainer.group import TrainerGroup
from trainer.worker import TrainerWorker

__all__ = ["TrainerGroup", "TrainerWorker", "head_logprobs"]
