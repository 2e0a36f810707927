#!/usr/bin/env bash
# The README's first command: set up .venv (idempotent), then train the tiny MoE GPT with MicroEP on
# 4 CPU processes (EP=4, gloo) and write the balance report. Arguments go to `microep train`
# (e.g. --steps 40, --config configs/tiny-cpu.yaml, --output DIR, --dispatcher alltoall).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
args=("$@")
if [[ " $* " != *" --output "* && " $* " != *" --output="* ]]; then
    args+=(--output "runs/demo-$(date +%Y%m%d-%H%M%S)")
fi
exec .venv/bin/microep train "${args[@]}"
