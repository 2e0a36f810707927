#!/usr/bin/env bash
# The test command: ruff, the whole suite on megatron-core 0.16.1, the megatron tests on 0.19.2, and
# the megatron tests on 0.20.0 (Megatron-LM main, from its source snapshot).
#
#   bash scripts/test.sh
#
# Sets up .venv (0.16.1) and .venv-mcore019 (0.19.2) with scripts/setup_env.sh (a no-op when they
# are already set up) and runs the three pytest sessions even if one fails; exits non-zero if any
# failed or collected no tests. The Megatron-LM source snapshots come from ../shared/megatron-lm
# beside the repository (MEGATRON_LM_SNAPSHOTS names another folder): the whole suite runs
# Megatron-LM's own entry point from each of them (tests/launch), and the third session puts main's
# megatron.core (0.20.0, not on PyPI yet) first on PYTHONPATH in the 0.19.2 venv. Without snapshots
# the third session is skipped with a message, and fails under CI (CI set).
set -euo pipefail
cd "$(dirname "$0")/.."

run_pytest() {  # VENV LABEL PYTEST_ARGS...  (PYTHONPATH, if set, is passed on)
    local venv=$1 label=$2 rc=0 start=$SECONDS
    shift 2
    local mcore
    mcore=$("$venv/bin/python" -c 'from megatron.core import package_info as p; import os
print(p.__version__, "from", os.path.dirname(os.path.dirname(os.path.dirname(p.__file__))))' 2>/dev/null ||
        echo "not installed")
    echo "=== $label: megatron-core $mcore ($venv): pytest $*"
    # Each session's expected skips (real TE, CUDA, ...) are declared under its label in
    # tests/expected_skips.yaml; any other skip fails the session (tests/conftest.py).
    MICROEP_EXPECTED_SKIPS="$label" "$venv/bin/python" -m pytest -q -rs "$@" || rc=$?
    if ((rc == 5)); then
        echo "=== $label: pytest collected no tests" >&2
    fi
    echo "=== $label: exit $rc, megatron-core $mcore, $((SECONDS - start)) s"
    return "$rc"
}

failed=()
start=$SECONDS
bash scripts/setup_env.sh .venv 0.16.1
echo "=== ruff: format check and lint (ruff.toml)"
.venv/bin/ruff format --check --quiet . && .venv/bin/ruff check --quiet . || failed+=("ruff format/lint")
run_pytest .venv "suite" tests || failed+=("whole suite on megatron-core 0.16.1")

bash scripts/setup_env.sh .venv-mcore019 0.19.2
run_pytest .venv-mcore019 "megatron" tests/megatron || failed+=("tests/megatron on megatron-core 0.19.2")

snapshots=${MEGATRON_LM_SNAPSHOTS:-$(cd .. && pwd)/shared/megatron-lm}
main_archive=$snapshots/Megatron-LM-main.tar.gz
if [[ -f $main_archive ]]; then
    checkout_root=$(mktemp -d)
    trap 'rm -rf "$checkout_root"' EXIT
    tar xzf "$main_archive" -C "$checkout_root"
    main_checkout=$(find "$checkout_root" -mindepth 1 -maxdepth 1 -type d)
    PYTHONPATH=$main_checkout run_pytest .venv-mcore019 "megatron-main" tests/megatron ||
        failed+=("tests/megatron on megatron-core 0.20.0 (Megatron-LM main)")
elif [[ -n ${CI:-} ]]; then
    echo "=== megatron-main: no Megatron-LM snapshot at $main_archive" >&2
    failed+=("tests/megatron on megatron-core 0.20.0: no snapshot at $main_archive")
else
    echo "=== megatron-main: skipped: no Megatron-LM snapshot at $main_archive (set MEGATRON_LM_SNAPSHOTS)"
fi

echo "=== scripts/test.sh: $((SECONDS - start)) s in all"
if ((${#failed[@]})); then
    printf '=== FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "=== all passed"
