#!/usr/bin/env bash
# One Slurm task per node (started by srun from the .sbatch scripts, inside the container when one is
# used): starts torchrun with a c10d rendezvous on the job's first node, then the chosen entry point.
#
#   node_launch.sh megatron-lm   -> scripts/pretrain_gpt_microep.py $(microep launch-args CONFIG) EXTRA...
#   node_launch.sh embedded      -> microep train --config CONFIG EXTRA...   (CPU ranks, gloo)
#
# Environment (exported by the .sbatch script): CONFIG, MICROEP_SET (space-separated SECTION.KEY=VALUE
# overrides), NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, MICROEP_REPO (this checkout), PYTHON.
set -euo pipefail

mode=${1:?usage: node_launch.sh megatron-lm|embedded [extra arguments]}
shift
: "${CONFIG:?CONFIG is not set}" "${NPROC_PER_NODE:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${MICROEP_REPO:?}"
python=${PYTHON:-python3}
cd "$MICROEP_REPO"

sets=()
for item in ${MICROEP_SET:-}; do
    sets+=(--set "$item")
done

rendezvous=(
    --nnodes "${SLURM_NNODES:-1}" --nproc-per-node "$NPROC_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-local}"
)

case $mode in
    megatron-lm)
        # NUL-separated: values with spaces or shell characters (--moe-layer-freq patterns) stay intact.
        mapfile -d '' flags < <("$python" -m megatron_microep launch-args --null "$CONFIG" "${sets[@]}")
        ((${#flags[@]})) || { echo "node_launch: microep launch-args $CONFIG printed nothing" >&2; exit 1; }
        exec "$python" -m torch.distributed.run "${rendezvous[@]}" scripts/pretrain_gpt_microep.py "${flags[@]}" "$@"
        ;;
    embedded)
        exec "$python" -m torch.distributed.run "${rendezvous[@]}" -m megatron_microep train --config "$CONFIG" \
            "${sets[@]}" "$@"
        ;;
    *)
        echo "node_launch: unknown mode '$mode' (megatron-lm or embedded)" >&2
        exit 2
        ;;
esac
