#!/usr/bin/env bash
# A Python 3.12 environment with Megatron-Bridge for scripts/check_bridge.py (docs/launch.md, "Megatron-Bridge").
#
#   scripts/setup_bridge_env.sh VENV_DIR
#
# Megatron-Bridge 0.6 needs Python 3.12 (PYTHON, default python3.12), and for 3.12 PyPI serves torch as
# a CUDA build (it runs on CPU). Installed: torch, megatron-core[mlm] 0.19.2, megatron-bridge 0.6.2,
# Bridge's declared dependencies and megatron-core's "dev" extra (which Bridge requires) except
# fast-hadamard-transform (a source package that needs CUDA to build), then this package. PyPI has no
# nvidia-resiliency-ext 0.6.0 (megatron-core's pin) for this platform; the 0.4.1 it resolves to has no
# __version__, which megatron-core 0.19.2's checkpointing reads at import, so it is removed again
# (megatron-core runs without it). Prints seconds and venv size per step.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 VENV_DIR" >&2; exit 2; }
venv=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3.12}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
TORCH=2.14.1 MCORE=0.19.2 BRIDGE=0.6.2

start=$(date +%s)
step() {
    local name=$1 t0
    shift
    t0=$(date +%s)
    "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    echo "setup_bridge_env: $name: $(($(date +%s) - t0)) s, venv $(du -sm "$venv" | cut -f1) MB"
}
pip() { "$venv/bin/python" -m pip install --quiet --progress-bar off "$@"; }

[[ -e $venv ]] && { echo "setup_bridge_env: $venv exists; give a new directory" >&2; exit 2; }
step venv "$python" -m venv "$venv"
step torch pip "torch==$TORCH"
step megatron-core pip "megatron-core[mlm]==$MCORE"
step megatron-bridge pip --no-deps "megatron-bridge==$BRIDGE"
requirements=$venv/bridge-requirements.txt
"$venv/bin/python" - "$requirements" <<'EOF'
import sys
from importlib.metadata import requires

# Unconditional requirements of Bridge, and megatron-core's "dev" extra (Bridge asks for megatron-core[dev,mlm]).
bridge = [r for r in requires("megatron-bridge") if "extra ==" not in r and not r.startswith("megatron-core")]
dev = [r.split(";")[0].strip() for r in requires("megatron-core") if 'extra == "dev"' in r]
keep = [r for r in bridge + dev if not r.startswith("fast-hadamard-transform") and not r.startswith("nvidia-resiliency-ext==")]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF
step bridge-dependencies pip -r "$requirements"
step nvidia-resiliency-ext "$venv/bin/python" -m pip uninstall --yes --quiet nvidia-resiliency-ext
step megatron-microep pip --no-deps -e "$repo"
step megatron-microep-dependencies pip numba ortools tokenizers matplotlib psutil
echo "setup_bridge_env: $venv ready in $(($(date +%s) - start)) s, $(du -sm "$venv" | cut -f1) MB" \
    "(torch $TORCH, megatron-core $MCORE, megatron-bridge $BRIDGE)"
