#!/bin/bash
# One node's share of a multi-node training run (started by infra/slurm/train.sbatch through srun, once per
# node): DeepSpeed's launcher without ssh (--no_ssh) starts GPUS_PER_NODE ranks of trainer/train.py here, with
# global ranks from this node's rank (SLURM_NODEID) and the node list, rendezvous at MASTER_ADDR:MASTER_PORT.
# The hostfile only tells the launcher every node's rank count; nothing connects to the names in it.
set -euo pipefail
: "${SLURM_NODEID:?}" "${NOISEREFINE_NODES:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${GPUS_PER_NODE:?}"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
hostfile="${TMPDIR:-/tmp}/noiserefine-hostfile-${SLURM_JOB_ID:-$$}-node$SLURM_NODEID"
for node in $NOISEREFINE_NODES; do echo "$node slots=$GPUS_PER_NODE"; done > "$hostfile"
# exec: srun's signals (SIGTERM at the time limit) reach the launcher, which passes them to the ranks
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" trainer/train.py "$@"
