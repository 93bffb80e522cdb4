#!/bin/bash
# One-shot GPU run of bench/{gang_packing,sparse_vs_dense,fused,fused_members,learning_rules,perturbation,
# snn_ddqn}.py with --device cuda, each under its own wall budget, everything done by GB_T0 + GB_TOTAL s.
# Same-machine CPU baselines (1-4 threads, CUDA hidden) run in the background meanwhile and are appended to
# the matching file at the end. Outputs (8 files) go to $OUT. No `set -e`: a failing bench never stops the rest.
#
# Here, once: bash bench/gpu_wheels.sh (the packages the GPU machine lacks, as wheels in .whl, git-ignored).
# Device run (the device tool's `run`, carry [".whl"], timeout_s 390):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; bash bench/gpu_all.sh
# Local check: GB_DEV=cpu GB_SMOKE=1 PY=/path/python OUT=/tmp/x bash bench/gpu_all.sh   (tiny sizes, same flags)
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/.whl/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MUJOCO_GL=egl PYGAME_HIDE_SUPPORT_PROMPT=1
PY=${PY:-python3}
DEV=${GB_DEV:-cuda}
SMOKE=${GB_SMOKE:-0}
TOTAL=${GB_TOTAL:-345}          # seconds from T0 (the device command's start, before its pip install) to the end
T0=$GB_T0
if [ -z "$T0" ]; then  # the command's shell: the parent (pip ran in it), or this very process if bash exec'd us
  tck=$(getconf CLK_TCK 2>/dev/null || echo 100)
  for pid in $PPID $$; do
    age=$(awk -v t="$tck" -v s="$(awk '{print $22}' /proc/$pid/stat 2>/dev/null)" \
          '{printf "%d", $1 - s / t}' /proc/uptime 2>/dev/null)
    if [ -n "$age" ] && (( age >= 0 && age <= 120 )); then T0=$(( $(date +%s) - age )); break; fi
  done
  [ -z "$T0" ] && { T0=$(date +%s); TOTAL=$(( TOTAL - 15 )); }
fi
WHEELS=${GB_WHEELS:-$PWD/.whl/extra}  # installed only where the machine lacks them
CPU_DIR=/tmp/gb_cpu; rm -rf "$CPU_DIR"; mkdir -p "$CPU_DIR"
TL=$OUT/0_env_timeline.txt

now() { date +%s; }
left() { echo $(( T0 + TOTAL - $(now) )); }
log() { echo "[t=$(( $(now) - T0 ))s] $*" | tee -a "$TL" >&2; }

# ---- conditional extras: only what the device lacks -----------------------------------------------------
extra=()
"$PY" -c 'import sys, importlib.metadata as m
from packaging.version import Version as V
sys.exit(V(m.version("typing_extensions")) < V("4.16.0"))' 2>/dev/null || extra+=("$WHEELS"/typing_extensions-*.whl)
"$PY" -c 'import sys, importlib.util as u; sys.exit(u.find_spec("sklearn") is None)' \
  || extra+=("$WHEELS"/scikit_learn-*.whl "$WHEELS"/joblib-*.whl "$WHEELS"/threadpoolctl-*.whl)
if (( ${#extra[@]} )); then
  log "installing extras: ${extra[*]##*/}"
  rm -rf /tmp/site2; "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site2 "${extra[@]}" >> "$TL" 2>&1
  export PYTHONPATH=/tmp/site2${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- the machine --------------------------------------------------------------------------------------
{
  echo "# bench/gpu_all.sh on $(uname -n) $(date -u +%FT%TZ); dev=$DEV smoke=$SMOKE; PYTHONPATH=$PYTHONPATH"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit --format=csv 2>&1
  echo "cpus $(nproc): $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); load $(cut -d' ' -f1-3 /proc/loadavg)"
  grep -E "^(MemTotal|MemAvailable)" /proc/meminfo | tr -s " " | tr "\n" ";"; echo
  "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
import torch
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "device", torch.cuda.get_device_name(0) if cuda else "none", "threads", torch.get_num_threads())
for p in ["numpy", "pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection",
          "gymnasium", "farama_notifications", "Box2D", "pygame-ce", "snntorch", "scikit-learn", "pyarrow", "pandas"]:
    try:
        print(f"  {p} {md.version(p)}")
    except Exception as exc:
        print(f"  {p} MISSING ({exc})")
bad = []
for m in ["pydantic", "gymnasium", "Box2D", "pygame", "snntorch", "worker.trainers.snn_ddqn", "worker.trainers.snn_fused",
          "worker.trainers.sparse_fused", "worker.trainers.gated_fused", "worker.trainers.learning_rules_fused",
          "worker.trainers.perturbation_fused", "worker.dry_step", "worker.gang_size"]:
    try:
        importlib.import_module(m)
    except Exception as exc:
        bad.append(m); print(f"  IMPORT FAILED {m}: {type(exc).__name__}: {exc}")
import gymnasium as gym
for env in ("CartPole-v1", "LunarLander-v3"):
    try:
        gym.make(env).reset(seed=0); print(f"  env {env} ok")
    except Exception as exc:
        print(f"  env {env} FAILED: {type(exc).__name__}: {exc}")
print("imports:", "all ok" if not bad else f"FAILED {bad}")
EOF
} >> "$TL" 2>&1

# ---- one bench, foreground: step FILE CAP RESERVE "SMOKE ARGS" script args... -----------------------------
# CAP: its own wall limit; RESERVE: seconds kept for the steps after it. In smoke mode the smoke args are
# appended (argparse: the last occurrence wins) and DEV replaces cuda.
step() {
  local file=$OUT/$1 cap=$2 reserve=$3 smoke=$4; shift 4
  local args=("$@"); (( SMOKE )) && args+=($smoke)
  local budget=$(( $(left) - reserve )); (( budget > cap )) && budget=$cap
  if (( budget < 8 )); then
    echo "## SKIPPED (only ${budget}s left): ${args[*]}" >> "$file"; log "SKIPPED ${file##*/}: ${args[*]}"; return
  fi
  log "start ${file##*/} (budget ${budget}s): ${args[*]}"
  echo "## \$ python ${args[*]}    [wall budget ${budget}s, t=$(( $(now) - T0 ))s]" >> "$file"
  local began=$(date +%s%N)
  timeout -k 5 "$budget" "$PY" "${args[@]}" >> "$file" 2>&1
  local rc=$? wall; wall=$(( ($(date +%s%N) - began) / 1000000 ))
  local note=""; (( rc == 124 || rc == 137 )) && note=" TIMED OUT"
  wall="$(( wall / 1000 )).$(printf %03d $(( wall % 1000 )))"
  echo "## rc=$rc$note, wall ${wall}s" >> "$file"; echo >> "$file"
  log "end ${file##*/} rc=$rc$note wall ${wall}s"
}

# ---- same-machine CPU baselines in the background: bg NAME CAP "SMOKE ARGS" script args... ----------------
bg_pids=()
bg() {
  local name=$1 cap=$2 smoke=$3; shift 3
  local args=("$@"); (( SMOKE )) && args+=($smoke)
  local budget=$(( $(left) - 12 )); (( budget > cap )) && budget=$cap
  (( budget < 8 )) && return
  echo "## CPU baseline, same machine, in the background while the GPU benches ran (CUDA hidden):" > "$CPU_DIR/$name"
  echo "## \$ python ${args[*]}    [wall budget ${budget}s, t=$(( $(now) - T0 ))s]" >> "$CPU_DIR/$name"
  log "background start $name (budget ${budget}s): ${args[*]}"
  ( began=$(now)
    CUDA_VISIBLE_DEVICES= timeout -k 5 "$budget" "$PY" "${args[@]}" >> "$CPU_DIR/$name" 2>&1
    rc=$?; note=""; (( rc == 124 || rc == 137 )) && note=" TIMED OUT"
    echo "## rc=$rc$note, wall $(( $(now) - began ))s" >> "$CPU_DIR/$name"
    log "background end $name rc=$rc$note" ) &
  bg_pids+=($!)
}

bg 2_sparse_vs_dense.txt 240 "--sizes 300 --densities 0.01,1 --repeats 1" \
   bench/sparse_vs_dense.py --device cpu --threads 4
bg 7_snn_ddqn.txt 75 "--seconds 0.6" \
   bench/snn_ddqn.py --part throughput --devices cpu --seconds 3 --rounds 1 --threads 1
bg 6_perturbation.txt 150 "--lengths 10 --perturbations 4 --repeats 1" \
   bench/perturbation.py --part step --device cpu --dtype float32 --threads 1 --repeats 3
bg 5_learning_rules.txt 200 "--populations 8 --trial-length 20 --batches 8 --block-steps 5 --repeats 1" \
   bench/learning_rules.py --part generation --device cpu --threads 1 --repeats 2

# ---- the GPU benches, one at a time (RESERVE = what the later steps are guaranteed) ------------------------
step 1_gang_packing.txt 35 265 "" \
   bench/gang_packing.py --device "$DEV" --gang 1024 --check 16 \
   --trainers gated_rnn,sparse_rnn,snn_ddqn,perturbation,learning_rules
step 2_sparse_vs_dense.txt 45 235 "--sizes 300 --densities 0.01,1 --repeats 1" \
   bench/sparse_vs_dense.py --device "$DEV" --repeats 5 --threads 2
step 3_fused.txt 110 195 "--gpu-steps 1" \
   bench/fused.py --device "$DEV" --gpu-steps 20 --sizes 32 --steps 2 --configs 2 --rounds 1
step 4_fused_members.txt 40 165 "--members 2 --episodes 2 --rounds 1" \
   bench/fused_members.py --device "$DEV" --trainer snn_ddqn --members 8 --episodes 8 --rounds 2
step 4_fused_members.txt 50 135 "--members 2 --steps 2 --rounds 1" \
   bench/fused_members.py --device "$DEV" --trainer sparse_rnn --members 8 --steps 40 --rounds 1
step 5_learning_rules.txt 35 110 "--populations 8 --trial-length 20 --batches 8 --block-steps 5 --repeats 1" \
   bench/learning_rules.py --part generation --device "$DEV" --repeats 2
step 5_learning_rules.txt 20 100 "--members 2 --fused-steps 2 --fused-trial-length 20 --fused-batch 8 --fused-validation 20" \
   bench/learning_rules.py --part fused --device "$DEV" --members 8 --fused-steps 10 --repeats 2
step 5_learning_rules.txt 20 90 "--members 2 --fused-trial-length 20 --fused-batch 8 --fused-validation 20" \
   bench/learning_rules.py --part fused --device "$DEV" --members 4 --fused-steps 2 --repeats 1 \
   --fused-trial-length 750 --fused-batch 500 --fused-validation 2000
step 6_perturbation.txt 45 60 "--lengths 10 --perturbations 4 --repeats 1 --epochs 3" \
   bench/perturbation.py --part all --device "$DEV" --repeats 3
step 6_perturbation.txt 20 50 "--members 2 --fused-epochs 2 --fused-repeats 1" \
   bench/perturbation.py --part fused --device "$DEV" --members 8 --fused-epochs 20 --fused-repeats 2
step 7_snn_ddqn.txt 55 5 "--seconds 0.6" \
   bench/snn_ddqn.py --part throughput --devices "$DEV" --seconds 3 --rounds 1 --threads 1

# ---- collect the background CPU baselines --------------------------------------------------------------
for pid in "${bg_pids[@]}"; do wait "$pid"; done
for f in "$CPU_DIR"/*; do [ -f "$f" ] && { echo; cat "$f"; } >> "$OUT/$(basename "$f")"; done
log "all done; files: $(cd "$OUT" && ls | tr '\n' ' ')"
