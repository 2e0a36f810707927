#!/usr/bin/env bash
# The README's first command: set up .venv (idempotent) and run the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
exec .venv/bin/microep demo "$@"
