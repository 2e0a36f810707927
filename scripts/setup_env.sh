#!/usr/bin/env bash
# Create or update a virtual environment for megatron-microep with one megatron-core version.
#
#   scripts/setup_env.sh VENV_DIR [MCORE_VERSION]      (MCORE_VERSION defaults to 0.16.1)
#
# Installs torch 2.13.0 (kept as is if the venv already has a CUDA build of torch), megatron-core,
# then this package in editable mode with its test and megatron-lm extras (the latter: what
# Megatron-LM's own training code imports, for scripts/pretrain_gpt_microep.py). megatron-core 0.17+ declares
# Python >= 3.12 although megatron.core itself runs on 3.11; there it is installed with
# --no-deps --ignore-requires-python after its real runtime imports (numpy, packaging, and triton,
# which megatron/core/transformer/moe/paged_stash.py imports unconditionally).
# megatron-core 0.20 is not on PyPI yet: CI runs it from the Megatron-LM main snapshot on PYTHONPATH
# in the 0.19.2 venv (scripts/test.sh).
# Re-running with the same arguments is a no-op (a stamp in the venv records what was installed).
# PYTHON selects the interpreter used to create a new venv (default python3).
set -euo pipefail

usage="usage: $0 VENV_DIR [MCORE_VERSION]   (MCORE_VERSION: 0.16.x to 0.19.x, default 0.16.1)"
[[ $# -ge 1 && $# -le 2 ]] || { echo "$usage" >&2; exit 2; }
venv=$1
mcore=${2:-0.16.1}
torch_version=2.13.0

[[ $mcore =~ ^0\.(1[6-9])\.[0-9]+$ ]] || {
    echo "setup_env: unsupported megatron-core version '$mcore' (supported: 0.16.x to 0.19.x)" >&2
    exit 2
}
mcore_minor=${BASH_REMATCH[1]}

repo=$(cd "$(dirname "$0")/.." && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [[ ! -e $venv ]]; then
    echo "setup_env: creating $venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$venv"
fi
py=$venv/bin/python
[[ -x $py ]] || { echo "setup_env: $venv exists but has no bin/python" >&2; exit 1; }
pip_install() {
    # This machine's pip config names index folders that may be absent; pip warns once per package.
    local status=0
    "$py" -m pip install --quiet --progress-bar off "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; } \
        || status=$?
    return "$status"
}

# What a finished setup looks like; any change (version, setup.py, this script) redoes the install.
stamp_file=$venv/.microep-setup-stamp
stamp="mcore=$mcore torch=$torch_version repo=$repo $(cat "$repo/setup.py" "$0" | sha256sum | cut -c1-16)"

installed_mcore() {
    # Distribution metadata, not megatron.core.__version__: the latter appends the short hash of
    # whatever git checkout surrounds site-packages (ours, for a venv inside the repo).
    "$py" -c 'import importlib.metadata as md; print(md.version("megatron-core"))' 2>/dev/null || true
}

if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" && $(installed_mcore) == "$mcore" ]]; then
    echo "setup_env: $venv up to date (megatron-core $mcore)"
    exit 0
fi
rm -f "$stamp_file"

torch_state=$("$py" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null || echo "none None")
read -r have_torch have_cuda <<<"$torch_state"
if [[ $have_cuda != None ]]; then
    echo "setup_env: keeping CUDA torch $have_torch (CUDA $have_cuda)"
elif [[ $have_torch == "$torch_version" || $have_torch == "$torch_version+"* ]]; then
    echo "setup_env: torch $have_torch already installed"
else
    echo "setup_env: installing torch==$torch_version"
    pip_install "torch==$torch_version"
fi

if [[ $(installed_mcore) == "$mcore" ]]; then
    echo "setup_env: megatron-core $mcore already installed"
elif ((mcore_minor >= 17)); then
    echo "setup_env: installing megatron-core $mcore (--no-deps --ignore-requires-python)"
    pip_install numpy packaging triton
    pip_install --no-deps --ignore-requires-python "megatron-core==$mcore"
else
    echo "setup_env: installing megatron-core $mcore"
    pip_install "megatron-core==$mcore"
fi

# After megatron-core: pip keeps an installed megatron-core that satisfies setup.py's range,
# so a 0.19 install is not replaced by the newest release that declares Python 3.11 support.
echo "setup_env: installing megatron-microep (editable, with the test and megatron-lm extras)"
pip_install -e "$repo[test,megatron-lm]"

have_mcore=$(installed_mcore)
[[ $have_mcore == "$mcore" ]] || {
    echo "setup_env: expected megatron-core $mcore in $venv, found '${have_mcore:-none}'" >&2
    exit 1
}
# The imports the CPU harness and the plugin rely on, so a missing runtime dependency fails here
# and not as a skipped test.
"$py" -W ignore -c '
import megatron.core.transformer.moe.moe_layer, megatron.core.models.gpt.gpt_model
import megatron_microep.glue.cpu, megatron_microep.glue.distributed
import six, regex, pydantic, triton, pybind11, tensorboard  # the megatron-lm extra
' || { echo "setup_env: megatron-core $mcore does not import in $venv" >&2; exit 1; }

echo "$stamp" >"$stamp_file"
echo "setup_env: $venv ready (torch $("$py" -c 'import torch; print(torch.__version__)'), megatron-core $have_mcore)"
