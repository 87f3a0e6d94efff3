#!/bin/bash
# One task of a training job step (slurm/pretrain.sbatch runs it under srun on every node).
#
#   srun --kill-on-bad-exit=1 bash slurm/train-task.sh STATUS_FILE COMMAND...
#
# Runs the trainer. Its exit status 75 (stopped by a signal after the checkpoint: requeue me) is
# a non-zero exit to srun, and under --kill-on-bad-exit the first rank to leave would kill the
# others while they are still closing down; so the task reports it and exits 0 instead. Task 0
# writes it to STATUS_FILE (a file on the first node, where the job script reads it). Any other
# non-zero status passes through, and --kill-on-bad-exit ends the step at once.
#
# Exit status 5 is a hang: this rank saw no training progress for hang_timeout seconds, wrote its
# stacks to the run directory's hangs/ and stopped, and the others wait for a rank that will not
# come. The task treats it like a preemption: it requeues the job (at most KOLM_MAX_REQUEUES
# restarts, counted as the time-limit requeues are), which ends every task of it, and the job
# resumes from the newest complete checkpoint. Any task may see the hang (the frozen rank cannot
# report), so the task that does requeues; a second request meets a job already requeueing.
status_file=$1
shift
# srun forwards the job script's USR1 to every process of the step; the trainer handles it, this
# shell only waits for the trainer (the trainer sets its own handlers, so nothing is inherited).
trap ':' USR1 USR2 TERM
"$@" &
pid=$!
while true; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [[ $rc == 75 ]]; then
  echo "kolm: task ${SLURM_PROCID:-0} on $(hostname -s): exit 75 (checkpoint written; requeue)"
  [[ ${SLURM_PROCID:-0} == 0 ]] && echo 75 >"$status_file"
  exit 0
fi
if [[ $rc == 5 ]]; then
  restarts=${SLURM_RESTART_COUNT:-0}
  where="task ${SLURM_PROCID:-0} on ${SLURMD_NODENAME:-$(hostname -s)}: exit 5 (hang: no training progress for hang_timeout; stacks in the run directory's hangs/)"
  if (( restarts >= ${KOLM_MAX_REQUEUES:-50} )); then
    echo "kolm: $where; not requeueing: already restarted $restarts times (KOLM_MAX_REQUEUES=${KOLM_MAX_REQUEUES:-50})" >&2
  else
    echo "kolm: $where; asking Slurm to requeue job $SLURM_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID" 2>/dev/null || true
  fi
fi
exit "$rc"
