# syntax=docker/dockerfile:1.7
# megatron-microep on NVIDIA's PyTorch container with a pinned Megatron-LM.
#
#   docker build -t megatron-microep .
#   docker run --rm megatron-microep test                       # the test suite
#   docker run --rm megatron-microep demo --steps 40            # the embedded CPU run (microep train)
#   docker run --rm --gpus all --ipc=host -v /data:/data -e CONFIG=qwen3-30b-a3b \
#       -e MICROEP_SET="data.data_path=/data/corpus_text_document" megatron-microep \
#       pretrain --nproc-per-node 8 -- --save /data/ckpt      # one node; Slurm: scripts/slurm/
#   docker run --rm -e CONFIG=mixtral-8x7b -e WORLD_SIZE=32 -e CUDA_DEVICE_MAX_CONNECTIONS=1 \
#       -e MICROEP_SET="data.mock_data=true" megatron-microep check      # validate a launch
#   docker run --rm -it megatron-microep bash                   # anything else runs as given
#
# The image pins the NGC PyTorch release that Megatron-LM core_r0.19.0 tests with (its
# docker/.ngc_version.dev) and Megatron-LM at that branch's commit; the plugin is installed with
# the same `pip install -e .[test]` that scripts/setup_env.sh runs, while torch (CUDA) and
# TransformerEngine come from the NGC image and megatron-core from the Megatron-LM checkout.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.06-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_LM_REPO=https://github.com/NVIDIA/Megatron-LM.git
# core_r0.19.0 (megatron-core 0.19.1), 2026-08-20
ARG MEGATRON_LM_COMMIT=f8837c04ef6cbef6cdefb8de001aad63178aebbf

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    MEGATRON_LM_PATH=/opt/Megatron-LM MICROEP_REPO=/opt/megatron-microep \
    MICROEP_CACHE_DIR=/opt/microep-cache

# Megatron-LM at the pinned commit: megatron-core from the checkout (editable, so pretrain_gpt.py,
# gpt_builders.py and megatron.training come from the same commit), plus the training extras its
# pretrain_gpt.py imports.
RUN git clone --filter=blob:none "${MEGATRON_LM_REPO}" "${MEGATRON_LM_PATH}" \
 && git -C "${MEGATRON_LM_PATH}" checkout --detach "${MEGATRON_LM_COMMIT}" \
 && pip install --no-build-isolation --no-deps -e "${MEGATRON_LM_PATH}" \
 && pip install six regex einops pydantic sentencepiece tiktoken transformers flask-restful
ENV PYTHONPATH=${MEGATRON_LM_PATH}

# The plugin (editable: configs/ and scripts/ are used from this copy). Listed paths only: a
# developer's build context also holds virtual environments and runs.
COPY setup.py README.md ${MICROEP_REPO}/
COPY megatron_microep ${MICROEP_REPO}/megatron_microep
COPY configs ${MICROEP_REPO}/configs
COPY scripts ${MICROEP_REPO}/scripts
COPY tests ${MICROEP_REPO}/tests
COPY docs ${MICROEP_REPO}/docs
COPY patches ${MICROEP_REPO}/patches
RUN pip install -e "${MICROEP_REPO}[test]" \
 && python -c "import megatron.core, megatron_microep.glue.spec; print('megatron-core', megatron.core.__version__)"

COPY --chmod=755 <<'EOF' /usr/local/bin/microep-entrypoint
#!/usr/bin/env bash
# test | demo [microep train args] | pretrain [torchrun args] -- [Megatron-LM args] | check ARGS | COMMAND...
set -euo pipefail
cd "$MICROEP_REPO"
config_flags() {
    flags=()
    [[ -n ${CONFIG:-} ]] || return 0
    local sets=() item
    for item in ${MICROEP_SET:-}; do sets+=(--set "$item"); done
    mapfile -d '' flags < <(microep launch-args --null "$CONFIG" "${sets[@]}")
}
case ${1:-test} in
    test)
        shift || true
        exec python -m pytest -q -rs tests "$@" ;;
    demo)
        shift
        exec microep train "$@" ;;
    pretrain)
        # pretrain [torchrun args] -- [Megatron-LM args]; CONFIG (+ MICROEP_SET) adds a preset's flags.
        shift
        torchrun_args=()
        while (($#)) && [[ $1 != -- ]]; do torchrun_args+=("$1"); shift; done
        (($#)) && shift
        config_flags
        exec torchrun "${torchrun_args[@]}" scripts/pretrain_gpt_microep.py "${flags[@]}" "$@" ;;
    check)
        # check [Megatron-LM args]: --microep-check args for CONFIG's flags (WORLD_SIZE: the job's size)
        shift
        config_flags
        exec python scripts/pretrain_gpt_microep.py --microep-check args "${flags[@]}" "$@" ;;
    *)
        exec "$@" ;;
esac
EOF

WORKDIR ${MICROEP_REPO}
ENTRYPOINT ["/usr/local/bin/microep-entrypoint"]
CMD ["test"]
