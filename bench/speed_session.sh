#!/usr/bin/env bash
# Issue 13 in one GPU call (one H200, ~4 minutes): the FP32-head kernel targets, then the trainer's
# profile and speed-option sweep at the Qwen2-0.5B and 1.5B shapes. Run from the repo root:
#
#   bash bench/speed_session.sh            # SPEED_DEADLINE_S=235 by default; files under $OUT
#
# Optional, before the call (the GPU machine reaches no registry):
#   * DeepSpeed (the real trainer path, ZeRO-2): the gpu-stack assembled in /tmp/site
#     (shared/gpu-stack/README.md); without it the sweep runs --engine torch (plain AdamW).
#   * Liger-Kernel: `pip download liger-kernel==0.8.5 --no-deps -d .whl` here and carry ".whl";
#     without it the +liger variants record an error and the others run.
# Writes (7 files): env.txt, kernels_lm_head_h200.{json,log}, trainer_profile_h200.{json,md,log},
# timeline.txt. Every step has its own timeout; each JSON is rewritten as results come in.
# The base profile is in bench/results/trainer_profile_h200.md; to spend a call on the variants only:
#   KERNEL_S=0 SPEED_VARIANTS="varlen+liger+mbt16k mbt16k varlen+liger varlen+compile+mbt16k" \
#   SPEED_PROFILE_ARGS="--no-profile-first" bash bench/speed_session.sh
# CPU dry run of the plumbing: PYTHON=.venv/bin/python SPEED_PRESETS=tiny SPEED_EXTRA_ARGS="--seq-len 256 --prompt-len 32" bash bench/speed_session.sh
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/speed-out}
mkdir -p "$OUT"
T0=$(date +%s)
TOTAL=${SPEED_DEADLINE_S:-235}
KERNEL_S=${KERNEL_S:-75}
left() { echo $((TOTAL - ($(date +%s) - T0))); }
mark() { echo "$(($(date +%s) - T0))s $*" | tee -a "$OUT/timeline.txt"; }

if [ -f /tmp/site/env.sh ]; then . /tmp/site/env.sh; fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/speed_site .whl/*.whl \
    && export PYTHONPATH=/tmp/speed_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mark "start"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  "$PY" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
  git log -1 --format='commit %H %s' 2>/dev/null
} > "$OUT/env.txt" 2>&1

# 1) FP32 LM head at T=16k, H=4096, V=151,936: fp16x2 (default backward chunks and one other)
#    against naive fp32 / bf16, with the small-shape float64 check of forward and backward first.
if [ "$KERNEL_S" -gt 0 ]; then
  mark "kernels_lm_head"
  timeout "$KERNEL_S" "$PY" bench/kernels_lm_head.py --T 16384 --H 4096 --modes fp16x2 --no-liger \
    --bwd-chunks 8:2048 --out "$OUT/kernels_lm_head_h200.json" > "$OUT/kernels_lm_head_h200.log" 2>&1
  mark "kernels_lm_head rc=$?"
else
  mark "kernels_lm_head skipped (KERNEL_S=0)"
fi

# 2) trainer: profile + sweep, both shapes in one process, stopping cleanly before the deadline.
BUDGET=$(( $(left) - 8 ))
mark "trainer_profile budget=${BUDGET}s"
timeout $((BUDGET + 6)) "$PY" bench/trainer_profile.py --engine auto \
  --presets ${SPEED_PRESETS:-qwen2-0.5b qwen2-1.5b} \
  --variants ${SPEED_VARIANTS:-base varlen+liger+mbt16k varlen+liger qwen2-0.5b:mbt16k qwen2-1.5b:varlen+liger+seq16k \
             qwen2-0.5b:varlen+compile+mbt16k qwen2-0.5b:flex+mbt16k qwen2-0.5b:varlen+liger+ac+mbt32k} \
  ${SPEED_PROFILE_ARGS:---profile-variants varlen+liger+mbt16k} \
  --seqs-per-step 8 --steps 3 --warmup 1 --deadline-s "$BUDGET" ${SPEED_EXTRA_ARGS:-} \
  --out "$OUT/trainer_profile_h200.json" --md "$OUT/trainer_profile_h200.md" > "$OUT/trainer_profile_h200.log" 2>&1
mark "trainer_profile rc=$?"
grep -E "^(RESULT|SKIP|VARLEN)" "$OUT/trainer_profile_h200.log"
[ -f "$OUT/kernels_lm_head_h200.log" ] && grep -E "^TARGETS" "$OUT/kernels_lm_head_h200.log"
mark "done"
