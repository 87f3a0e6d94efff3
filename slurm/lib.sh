# Shared by kolm's job scripts, which set KOLM_HOME (the checkout) and source this file.
# The script sbatch runs is a copy in Slurm's spool, so they find the checkout from the job's
# original command (`scontrol show job`), or from KOLM_HOME when it is set.

kolm_require_slurm() {
  local v
  for v in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NNODES; do
    if [[ -z ${!v:-} ]]; then
      echo "kolm: $v is not set: submit this script with sbatch (it is a Slurm job script)" >&2
      exit 2
    fi
  done
}

kolm_setup() {
  kolm_require_slurm
  [[ -f $KOLM_HOME/slurm/site.sh ]] || { echo "kolm: $KOLM_HOME/slurm/site.sh not found; set KOLM_HOME" >&2; exit 2; }
  # shellcheck source=site.sh
  source "$KOLM_HOME/slurm/site.sh"
  echo "kolm: job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}, $(date -u '+%F %T') UTC"
}

# kolm CLI, inside the container when site.sh names one.
kolm_cmd() {
  # shellcheck disable=SC2086
  $KOLM_CONTAINER "$KOLM_PYTHON" -m kolm "$@"
}
