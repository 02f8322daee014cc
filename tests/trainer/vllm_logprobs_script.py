"""Run by test_group_vs_reference.py in its own interpreter (vLLM's in-process engine
beside a live Ray cluster and pytest is asking for trouble): load a folder with vLLM in
fp32, sample a few tokens after a prompt, print their ids and log-probs as JSON.

    python vllm_logprobs_script.py MODEL_DIR PROMPT_IDS_JSON
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    path, prompt = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=path, dtype="float32", gpu_memory_utilization=0.2, max_model_len=256,
              enforce_eager=True, seed=0)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=1.0, logprobs=0))[0]
    comp = out.outputs[0]
    logprobs = [d[t].logprob for t, d in zip(comp.token_ids, comp.logprobs)]
    print("VLLM_RESULT " + json.dumps({"token_ids": list(comp.token_ids), "logprobs": logprobs}), flush=True)
