"""Reward functions named by import path ("reward_helpers:<name>") in the scorer tests.

pytest puts this folder on sys.path (no __init__.py), and the scorer passes sys.path on
to its worker processes, so the workers import this module too.
"""

import os
import time

NOT_CALLABLE = 42


def flaky(prompt, response, answer, metadata):
    """Behaves as metadata["mode"] says: "ok" (1.0), "raise", "hang", "die", "nan", "text"."""
    mode = metadata.get("mode", "ok")
    if mode == "raise":
        raise ValueError(f"boom on {prompt!r}")
    if mode == "hang":
        time.sleep(1000)
    if mode == "die":
        os._exit(7)
    if mode == "nan":
        return float("nan")
    if mode == "text":
        return "not a number"
    return 1.0


def length(prompt, response, answer, metadata):
    return float(len(response))
