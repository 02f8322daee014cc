#!/usr/bin/env bash
# One GPU session, one shot: the GPU tests and the loop / weight-sync benchmarks, each stage under
# its own limit and all under one deadline, ordered by importance. Run from the repo root on the GPU
# machine after the gpu-stack environment is assembled (docs/gpu.md):
#
#   DEADLINE_S=560 bash bench/gpu_session.sh [STAGE ...]
#
# Stages (default: all, in this order; those needing 2 GPUs are skipped on 1):
#   tests       pytest tests/gpu: colocate on GPU 0; split 1+1 and the async loop on 2 GPUs  (~200 s)
#   sync        bench/weight_sync.py --path nccl: 0.5B / 1.5B / 7B vs raw NCCL        [2 GPUs] (~200 s)
#   colocate    bench/gpu_loop.py colocate_1:sync, Qwen2-0.5B shape, 5 steps                    (~110 s)
#   split       bench/gpu_loop.py split_1_1:sync + split_1_1:async, 0.5B, 5 steps each [2 GPUs] (~300 s)
#   split_sync  the sync half of split alone                                          [2 GPUs] (~200 s)
#   colocate15  bench/gpu_loop.py colocate_1:sync, Qwen2-1.5B shape, 20 steps (no OOM, memory)  (~170 s)
#   sync_ipc    bench/weight_sync.py --path ipc: 0.5B / 1.5B, colocated CUDA IPC                (~70 s)
#   colocate2   bench/gpu_loop.py colocate_2:sync, 0.5B, 5 steps                       [2 GPUs] (~110 s)
#   compare     bench/compare_algorithms.py, +experiment=long_addition_gpu: CISPO / DAPO / GRPO, 3 seeds each,
#               and CISPO with a bf16 head on seed 0: 10 runs side by side (engine and trainer on the two
#               GPUs); COMPARE_RUNS/COMPARE_RESUME/COMPARE_STEPS continue it over several calls;
#               compare.{md,json,png} also land in $OUT                              [2 GPUs] (~570 s)
#   compare_lr  the same recipe at 5x the step size: CISPO, DAPO, CISPO + trust-region mask, 3 seeds
#               (9 runs; where the CPU recipe separated them); compare_lr.{md,json,png} in $OUT [2 GPUs] (~570 s)
#   minimax     bench/minimax_mismatch.py --make gpu: bf16 hybrid MoE, FP32 head / routing replay on and off   (~150 s)
#   minimax_loop cispo-train model=minimax_tiny, split 1+1, 8 steps, routing recorded and replayed [2 GPUs] (~330 s)
#   minimax_colocate  the same loop colocated on one GPU (placement colocate_1)                    (~330 s)
# Two calls cover them all on a 2-GPU host: `tests sync colocate`, then `split colocate15 sync_ipc`.
#
# Everything lands in $OUT (3 files, rewritten after every stage, so a run cut short still returns
# what it finished): session.json (per stage: exit code, wall time, its JSON results), session.log
# (every stage's output, each cut to its last 400 lines), session.tar.gz (all logs, metrics, JSON).
# Stage files are kept in $WORK (default /tmp/cispo-gpu-session): a later call on the still-warm
# machine adds to them, and its session.json holds both calls.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
START=$(date +%s)
DEADLINE=${DEADLINE_S:-540}
OUT=${OUT:-/tmp/cispo-gpu-out}
WORK=${WORK:-/tmp/cispo-gpu-session}
mkdir -p "$OUT" "$WORK"
[ -f /tmp/site/env.sh ] && . /tmp/site/env.sh
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CISPO_CACHE=${CISPO_CACHE:-/tmp/cispo-cache} RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
PY=${PYTHON:-python3}
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests sync colocate split colocate15 sync_ipc colocate2)

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
say() { echo "### $(date +%H:%M:%S) [$(left)s left] $*" | tee -a "$WORK/session.log"; }

collect() {  # rewrite the three files in $OUT from what $WORK holds now
  "$PY" - "$WORK" "$OUT/session.json" <<'EOF'
import json, sys, pathlib
work, out = pathlib.Path(sys.argv[1]), sys.argv[2]
doc = {"stages": {}}
for st in sorted(work.glob("*.stage.json")):
    s = json.loads(st.read_text())
    res = work / f"{s['stage']}.json"
    if res.exists():
        try:
            s["results"] = json.loads(res.read_text())
        except ValueError as e:
            s["results"] = f"unreadable: {e}"
    doc["stages"][s["stage"]] = s
info = work / "env.json"
if info.exists():
    try:
        doc["env"] = json.loads(info.read_text())
    except ValueError:
        doc["env"] = info.read_text()[:2000]
pathlib.Path(out).write_text(json.dumps(doc, indent=1))
EOF
  : > "$OUT/session.log"
  cat "$WORK/session.log" >> "$OUT/session.log"
  for f in "$WORK"/*.log; do
    [ "$(basename "$f")" = session.log ] && continue
    echo "===== $(basename "$f") (last 400 lines)" >> "$OUT/session.log"
    tail -n 400 "$f" >> "$OUT/session.log"
  done
  tar -C "$WORK" -czf "$OUT/session.tar.gz" --exclude='*.safetensors' --exclude='checkpoints' . 2>/dev/null
}

kill_leftovers() {  # GPU processes a stage left behind (a run past its limit), by pid
  local pids
  pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  if [ -n "$pids" ]; then
    say "killing GPU processes left behind: $pids"
    for p in $pids; do kill -9 "$p" 2>/dev/null; done
    sleep 3
  fi
}

ensure_models() {  # the builtin Qwen2-shaped folders, made on the GPU (seconds) before a run needs them
  "$PY" -m launch.tiny_model --device cuda "$@" >> "$WORK/models.log" 2>&1
}

stage() {  # stage NAME NEED_GPUS WANT_S MIN_S command...
  local name=$1 need=$2 want=$3 min=$4 limit rc t0
  shift 4
  if [ "$GPUS" -lt "$need" ]; then
    say "$name skipped: needs $need GPUs, this machine has $GPUS"
    echo "{\"stage\": \"$name\", \"rc\": \"skipped\", \"why\": \"needs $need GPUs, have $GPUS\"}" > "$WORK/$name.stage.json"
    return
  fi
  limit=$(( $(left) - 15 ))
  [ "$limit" -gt "$want" ] && limit=$want
  if [ "$limit" -lt "$min" ]; then
    say "$name skipped: ${limit}s left under the deadline, it needs ${min}s"
    echo "{\"stage\": \"$name\", \"rc\": \"skipped\", \"why\": \"deadline\"}" > "$WORK/$name.stage.json"
    return
  fi
  say "$name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  say "$name rc=$rc in $(( $(date +%s) - t0 ))s"
  tail -n 25 "$WORK/$name.log" | tee -a "$WORK/session.log" > /dev/null
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - t0 )), \"limit_s\": $limit, \"gpus\": $GPUS, \"command\": \"$*\"}" \
    > "$WORK/$name.stage.json"
  kill_leftovers
  collect
}

loop_stage() {  # loop_stage NAME NEED_GPUS WANT_S MIN_S MODEL STEPS RUN_TIMEOUT_S PLACEMENT:MODE ...
  local name=$1 need=$2 want=$3 min=$4 model=$5 steps=$6 run_timeout=$7
  shift 7
  ensure_models "$model"
  # LOOP_OVERRIDES: extra Hydra overrides for every loop run (e.g. trainer speed options)
  stage "$name" "$need" "$want" "$min" "$PY" bench/gpu_loop.py --run "$@" --model "$model" --steps "$steps" \
    --timeout-s "$run_timeout" --work "$WORK/loop" --out "$WORK/$name.json" \
    ${LOOP_OVERRIDES:+--override $LOOP_OVERRIDES}
}

minimax_stage() {  # minimax_stage NAME NEED_GPUS WANT_S MIN_S PLACEMENT: cispo-train on minimax_tiny (a tiny model: the engine's share lowered)
  local name=$1 placement=$5
  stage "$name" "$2" "$3" "$4" "$PY" -m launch.main model=minimax_tiny rollout=gpu trainer=gpu placement="$placement" \
    steps="${MINIMAX_STEPS:-8}" rollout.record_routing=true trainer.routing_replay=true rollout.gpu_memory_utilization=0.2 \
    rollout.max_new_tokens=16 rollout.max_model_len=64 "logger.backends=[console,jsonl]" output_dir="$WORK/$name"
}

pytest_ready() {  # the image may lack pytest: take wheels carried in .gs/pytest (docs/gpu.md)
  "$PY" -c "import pytest" 2>/dev/null && return 0
  local wheels=${CISPO_PYTEST_WHEELS:-$REPO/.gs/pytest}
  ls "$wheels"/*.whl > /dev/null 2>&1 || return 1
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/pytest-site "$wheels"/*.whl >> "$WORK/session.log" 2>&1 || return 1
  export PYTHONPATH="$PYTHONPATH:/tmp/pytest-site"
}

say "cispo GPU session: $GPUS GPU(s), stages: ${STAGES[*]}, deadline ${DEADLINE}s, out $OUT"
"$PY" - "$WORK/env.json" >> "$WORK/session.log" 2>&1 <<'EOF'
import json, subprocess, sys, torch
try:
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()
except OSError as e:
    gpus = f"nvidia-smi: {e}"
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus}
for mod in ("vllm", "ray", "deepspeed", "transformers", "pytest"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
        info[mod] = f"missing ({type(e).__name__})"
open(sys.argv[1], "w").write(json.dumps(info))
EOF
cat "$WORK/env.json" | tee -a "$WORK/session.log"
collect
if ! "$PY" -c "import vllm, ray, deepspeed, hydra" 2>> "$WORK/session.log"; then
  say "vLLM / Ray / DeepSpeed / Hydra do not import: assemble the gpu-stack first (docs/gpu.md), nothing run"
  collect
  exit 3
fi

for s in "${STAGES[@]}"; do
  case $s in
    tests)
      if pytest_ready; then
        stage tests 1 300 150 env CISPO_GPU_REPORT="$WORK/tests.json" "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu
      else
        say "tests skipped: no pytest on this image and no wheels in .gs/pytest (docs/gpu.md)"
        echo '{"stage": "tests", "rc": "skipped", "why": "pytest missing"}' > "$WORK/tests.stage.json"
      fi ;;
    sync)
      stage sync 2 240 160 "$PY" bench/weight_sync.py --path nccl --sizes ${SYNC_SIZES:-0.5b 1.5b 7b} --out "$WORK/sync.json" ;;
    sync_ipc)
      stage sync_ipc 1 150 70 "$PY" bench/weight_sync.py --path ipc --sizes 0.5b 1.5b --out "$WORK/sync_ipc.json" ;;
    colocate)   loop_stage colocate 1 200 100 qwen2-0.5b-shape 5 190 colocate_1:sync ;;
    # the first loop run on a fresh machine pays vLLM's compile (~105 s start) and the trainer's first-step JIT
    # (~50 s): 160 s per run was too short for the sync run (seen on 2x H200)
    split)      loop_stage split 2 480 240 qwen2-0.5b-shape 5 240 split_1_1:sync split_1_1:async ;;
    split_sync) loop_stage split_sync 2 280 240 qwen2-0.5b-shape 5 250 split_1_1:sync ;;
    # 20 steps of 1.5B colocated: ~110 s start-up, ~66 s step 0, ~6.4 s a step after (one H200): ~300 s
    colocate15) loop_stage colocate15 1 ${COLOCATE15_S:-330} 150 qwen2-1.5b-shape 20 $(( ${COLOCATE15_S:-330} - 10 )) colocate_1:sync ;;
    colocate2)  loop_stage colocate2 2 200 100 qwen2-0.5b-shape 5 190 colocate_2:sync ;;
    compare)  # issue 11: CISPO vs DAPO vs GRPO, 3 seeds, + the bf16-head ablation on seed 0: 10 runs side by side.
      # COMPARE_RUNS inside the repo copy (an ignored folder there survives between calls on a warm machine,
      # /tmp does not) with COMPARE_RESUME=1 continues the runs in a later call; keep CISPO_CACHE there too
      # (a resumed run's warm-start model is a link into it). COMPARE_STEPS: the recipe's steps (100).
      ensure_models base-qwen2
      stage compare 2 570 200 "$PY" bench/compare_algorithms.py --experiment long_addition_gpu --seeds 0 1 2 \
        --parallel 10 --deadline-s $(( $(left) - 80 )) --out "$WORK/compare" \
        --runs-dir "${COMPARE_RUNS:-$WORK/compare_runs}" ${COMPARE_RESUME:+--resume} \
        --row cispo:algorithm=cispo --row dapo:algorithm=dapo --row grpo:algorithm=grpo \
        --row "cispo_bf16_head@0:algorithm=cispo rollout.lm_head_fp32=false trainer.lm_head_mode=bf16" \
        steps="${COMPARE_STEPS:-100}" trainer.save_every=10
      cp "$WORK"/compare.md "$WORK"/compare.json "$WORK"/compare.png "$OUT"/ 2>/dev/null ;;
    compare_lr)  # issue 11, where the CPU recipe separated them (docs/compare_algorithms.md): 5x the step size,
      # CISPO, DAPO and CISPO with M1's trust-region mask, 3 seeds: 9 runs side by side; resumable as compare
      ensure_models base-qwen2
      stage compare_lr 2 570 200 "$PY" bench/compare_algorithms.py --experiment long_addition_gpu --seeds 0 1 2 \
        --parallel 9 --deadline-s $(( $(left) - 80 )) --out "$WORK/compare_lr" --reference dapo_lr5x \
        --runs-dir "${COMPARE_RUNS:-$WORK/compare_runs}" ${COMPARE_RESUME:+--resume} \
        --row "cispo_lr5x:algorithm=cispo trainer.lr=2.5e-5" --row "dapo_lr5x:algorithm=dapo trainer.lr=2.5e-5" \
        --row "cispo_mask_lr5x:algorithm=cispo algorithm.eps_low=0.2 algorithm.token_mask=true trainer.lr=2.5e-5" \
        steps="${COMPARE_STEPS:-100}" trainer.save_every=10
      cp "$WORK"/compare_lr.md "$WORK"/compare_lr.json "$WORK"/compare_lr.png "$OUT"/ 2>/dev/null ;;
    minimax)  # issue 15: M1's Fig. 3 at small scale (bf16 hybrid MoE, FP32 head on/off, routing replay on/off)
      stage minimax 1 240 90 "$PY" bench/minimax_mismatch.py --make gpu --prompts 32 --samples 4 --new-tokens 256 \
        --work "$WORK/mm" --out "$WORK/minimax.json"
      cp "$WORK"/minimax.json "$OUT"/ 2>/dev/null ;;
    # issue 15: the real loop on minimax_tiny, routing recorded and replayed; step 0 takes ~60-90 s (Triton
    # JIT in vLLM, first-step compilation in the trainer): 330 s leaves room for steady steps
    minimax_loop)  # engine on GPU 0, trainer on GPU 1, NCCL weight sync
      minimax_stage minimax_loop 2 330 120 split_1_1 ;;
    minimax_colocate)  # one GPU: vLLM sleeps while the trainer steps, weights by CUDA IPC
      minimax_stage minimax_colocate 1 "${MINIMAX_COLOCATE_S:-330}" 150 colocate_1 ;;
    *) say "unknown stage $s (tests sync sync_ipc colocate split split_sync colocate15 colocate2 compare compare_lr minimax minimax_loop minimax_colocate)" ;;
  esac
done
say "done"
collect
