#!/usr/bin/env bash
# The test command: ruff, the whole suite on megatron-core 0.16.1, then the megatron tests on 0.19.2.
#
#   bash scripts/test.sh
#
# Sets up .venv (0.16.1) and .venv-mcore019 (0.19.2) with scripts/setup_env.sh (a no-op when they
# are already set up), runs both pytest sessions even if the first fails, and exits non-zero if
# either failed or collected no tests.
set -euo pipefail
cd "$(dirname "$0")/.."

run_pytest() {  # VENV LABEL PYTEST_ARGS...
    local venv=$1 label=$2 rc=0 start=$SECONDS
    shift 2
    local mcore
    mcore=$("$venv/bin/python" -c 'import importlib.metadata as md; print(md.version("megatron-core"))' 2>/dev/null || echo "not installed")
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

echo "=== scripts/test.sh: $((SECONDS - start)) s in all"
if ((${#failed[@]})); then
    printf '=== FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "=== all passed"
