"""Entry point of a reward worker process: ``python -m rewards._worker FD`` (started by RewardScorer)."""

import sys

from rewards.scorer import _worker_main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m rewards._worker FD (started by rewards.scorer.RewardScorer)")
    _worker_main(int(sys.argv[1]))
