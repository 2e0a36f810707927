# Sourced by the .sbatch scripts: rendezvous address, container arguments, launch environment.
# shellcheck shell=bash

# The batch script runs from a copy in Slurm's spool directory; SLURM_SUBMIT_DIR is where sbatch ran.
MICROEP_REPO=${MICROEP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $MICROEP_REPO/scripts/slurm/node_launch.sh ]] || {
    echo "set MICROEP_REPO to the megatron-microep checkout (or submit from it); not found: $MICROEP_REPO" >&2
    exit 2
}
export MICROEP_REPO
export CONFIG=${CONFIG:?set CONFIG to a configs/*.yaml file or preset name}

# torchrun's c10d rendezvous on the first node of the allocation.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1

# srun arguments that run node_launch.sh in CONTAINER_IMAGE through pyxis, when one is given; call
# after CONTAINER_MOUNTS is final.
set_container_args() {
    container_args=()
    [[ -n ${CONTAINER_IMAGE:-} ]] || return 0
    if ! srun --help 2>&1 | grep -q -- '--container-image'; then
        echo "CONTAINER_IMAGE is set but this Slurm has no pyxis (srun --container-image)" >&2
        exit 2
    fi
    # The checkout is mounted at the same path, so MICROEP_REPO means the same inside.
    container_args=(--container-image "$CONTAINER_IMAGE"
                    --container-mounts "$MICROEP_REPO:$MICROEP_REPO${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
}
