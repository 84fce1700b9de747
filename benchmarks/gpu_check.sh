#!/usr/bin/env bash
# The GPU check (issue 22): the lab's CUDA paths, end to end, on one GPU in about 8 minutes, with no internet.
#
#   benchmarks/gpu_check.sh [-o DIR] [--python PY] [--only ITEM,...] [--list]
#
# Items, in order (each a fresh `alignlab run` in its own process, under its own time limit):
#   prepare      convert the embedded SmolLM2-135M-Instruct GGUF to its safetensors cache once (timed apart)
#   quick-bf16   the quick profile's whole chain on CUDA with bf16 autocast (model.mixed_precision: bf16)
#   quick-qlora  the quick-qlora profile: bitsandbytes 4-bit (NF4) base on CUDA, LoRA on top, whole chain
#   sft prefs rm dpo ppo
#                the default recipe (recipes/configs/smollm2-135m/sentiment.yaml) on the embedded model, one stage
#                at a time in one run directory, a few steps each (prefs and rm only because ppo's reward is rm)
#   zero3-sft    the SFT stage under `accelerate launch` with DeepSpeed ZeRO-3 (recipes/accelerate/zero3.yaml),
#                a single process
# For each it prints: done or the error (the log's last line; the whole log is in DIR/logs/ITEM.log), the seconds,
# and the peak GPU memory the device reported while it ran, above what was in use before it started (nvidia-smi,
# sampled every 200 ms, MiB). Exit code 0 when every item is done, 1 when one failed, 2 for bad arguments.
set -uo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RECIPE="recipes/configs/smollm2-135m/sentiment.yaml"
ALL_ITEMS=(prepare quick-bf16 quick-qlora sft prefs rm dpo ppo zero3-sft)
OUT=""
PY=""
ONLY=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    -o|--output-dir) [[ $# -ge 2 ]] || { echo "gpu_check: $1 needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --python) [[ $# -ge 2 ]] || { echo "gpu_check: $1 needs a python executable" >&2; exit 2; }; PY="$2"; shift 2 ;;
    --only) [[ $# -ge 2 ]] || { echo "gpu_check: $1 needs items, e.g. --only sft,dpo" >&2; exit 2; }
            ONLY="$2"; shift 2 ;;
    --list) printf '%s\n' "${ALL_ITEMS[@]}"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'; see --help" >&2; exit 2 ;;
  esac
done

ITEMS=("${ALL_ITEMS[@]}")
if [[ -n "$ONLY" ]]; then
  IFS=',' read -r -a ITEMS <<< "$ONLY"
  for item in "${ITEMS[@]}"; do
    if [[ ! " ${ALL_ITEMS[*]} " == *" $item "* ]]; then
      echo "gpu_check: --only: unknown item '$item'; the items are: ${ALL_ITEMS[*]}" >&2
      exit 2
    fi
  done
fi

cd "$ROOT"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
[[ -n "$PY" && -x "$(command -v "$PY")" ]] || { echo "gpu_check: no python found; pass --python PATH" >&2; exit 2; }
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing); run it on a GPU machine" >&2
  exit 1
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
  echo "gpu_check: $PY has a torch without CUDA (the Makefile's venv is CPU-only); install a CUDA torch" >&2
  exit 1
fi
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$OUT/logs" || { echo "gpu_check: cannot create $OUT/logs" >&2; exit 2; }

# No internet: every model is the embedded one or the in-process tiny one, every dataset a local file.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
GPU="${CUDA_VISIBLE_DEVICES:-0}"; GPU="${GPU%%,*}"

used_mib() { nvidia-smi --id="$GPU" --query-gpu=memory.used --format=csv,noheader,nounits | head -n1 | tr -d ' '; }

# The default recipe, a few steps a stage: one DPO beta, small preference set, two PPO steps.
DEFAULT_SET=(
  --set stages.sft.args.max_steps=4 --set stages.sft.args.save_steps=4 --set stages.sft.args.logging_steps=2
  --set stages.prefs.data.limit=16 --set stages.prefs.max_new_tokens=24
  --set stages.rm.args.max_steps=4 --set stages.rm.args.save_steps=4 --set stages.rm.args.logging_steps=2
  --set 'stages.dpo.sweep={beta: [0.1]}' --set stages.dpo.args.max_steps=4 --set stages.dpo.args.save_steps=4
  --set stages.ppo.args.max_steps=2 --set stages.ppo.args.rollout_batch_size=8 --set stages.ppo.args.minibatch_size=4
  --set stages.ppo.args.save_steps=2
)
CLI=("$PY" -m recipes.cli)
RUNS="$OUT/runs"

# Sets LIMIT (seconds allowed) and CMD for an item; the limits add up to 470 s, inside the 8 minutes.
command_for() {
  case "$1" in
    prepare) LIMIT=45
             CMD=("$PY" -c 'from common.models import ensure_embedded_model; print(ensure_embedded_model())') ;;
    quick-bf16) LIMIT=45; CMD=("${CLI[@]}" run "$RECIPE" --output-dir "$RUNS" --run-id quick-bf16 --overwrite
                              --set profile=quick --set model.mixed_precision=bf16) ;;
    quick-qlora) LIMIT=60; CMD=("${CLI[@]}" run "$RECIPE" --output-dir "$RUNS" --run-id quick-qlora --overwrite
                               --set profile=quick-qlora) ;;
    sft) LIMIT=45; CMD=("${CLI[@]}" run "$RECIPE" --output-dir "$RUNS" --run-id default --overwrite --stage sft
                       "${DEFAULT_SET[@]}") ;;
    prefs|rm|ppo) LIMIT="$([[ $1 == ppo ]] && echo 60 || echo 40)"
                  CMD=("${CLI[@]}" run "$RECIPE" --output-dir "$RUNS" --run-id default --resume --stage "$1"
                       "${DEFAULT_SET[@]}") ;;
    dpo) LIMIT=45; CMD=("${CLI[@]}" run "$RECIPE" --output-dir "$RUNS" --run-id default --resume --stage dpo-beta0p1
                       "${DEFAULT_SET[@]}") ;;
    zero3-sft) LIMIT=90; CMD=("$PY" -m accelerate.commands.accelerate_cli launch
                             --config_file recipes/accelerate/zero3.yaml --num_processes 1 --main_process_port 29517
                             -m recipes.cli run "$RECIPE"
                             --output-dir "$RUNS" --run-id zero3 --overwrite --stage sft "${DEFAULT_SET[@]}") ;;
  esac
}

failed=0
printf '%-12s %-6s %8s %14s  %s\n' item result seconds "peak GPU MiB" "error (log: $OUT/logs/ITEM.log)"
for item in "${ITEMS[@]}"; do
  command_for "$item"
  log="$OUT/logs/$item.log"
  if [[ "$item" == zero3-sft ]] && ! "$PY" -c 'import deepspeed' > /dev/null 2>&1; then
    printf '%-12s %-6s %8s %14s  %s\n' "$item" error 0 - "deepspeed is not installed in $PY (pip install deepspeed)"
    failed=1
    continue
  fi
  before="$(used_mib)"
  nvidia-smi --id="$GPU" --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/logs/$item.mem" &
  sampler=$!
  start=$(date +%s.%N)
  timeout --kill-after=10 "$LIMIT" "${CMD[@]}" > "$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null
  peak="$(sort -n "$OUT/logs/$item.mem" | tail -n1 | tr -d ' ')"
  seconds="$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
  gpu_mib="$(awk -v p="${peak:-0}" -v b="${before:-0}" 'BEGIN { printf "%d", (p > b ? p - b : 0) }')"
  if [[ $rc -eq 0 ]]; then
    printf '%-12s %-6s %8s %14s\n' "$item" done "$seconds" "$gpu_mib"
  else
    failed=1
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
      why="over its ${LIMIT} s limit"
    else
      why="exit $rc: $(grep -v '^[[:space:]]*$' "$log" | tail -n1 | cut -c1-160)"
    fi
    printf '%-12s %-6s %8s %14s  %s\n' "$item" error "$seconds" "$gpu_mib" "$why"
  fi
done
echo "runs and logs: $OUT"
exit "$failed"
