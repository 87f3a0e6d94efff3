#!/bin/bash
# Submit the whole line as one Slurm dependency chain:
#   [clean (array)] -> [tokenizer] -> shard (array) -> merge -> pretrain (multi-node, requeues itself)
#                                                                          -> convert [-> eval]
#
#   slurm/pipeline.sh --recipe recipes/phi-1_5-ko.yaml --input corpus/*.jsonl.gz \
#       --tokenizer work/tokenizer [--vocab-size 32000] --shards work/shards \
#       --out models/phi-1_5-ko [--shard-tasks 8] [--nodes 4] [--time 24:00:00] \
#       [--clean work/clean [--clean-tasks 4]] [--documents lines|paragraphs|files] \
#       [--eval-tasks kobest_boolq,kobest_copa] [-- key=value ...]
#
# With --clean DIR, `kolm clean` (slurm/clean.sbatch) first writes the cleaned corpus to DIR, and
# the tokenizer and the shards are made from DIR instead of the --input files. --documents says how
# plain-text inputs hold their documents (see `kolm shard --help`); it goes to the first job that
# reads them.
# Run it on a login node, from the directory the job logs should go to (relative paths are
# relative to it too). The tokenizer is trained first only when
# --tokenizer does not exist yet (then --vocab-size is required). Everything after `--` overrides
# recipe keys; data and tokenizer are set from --shards and --tokenizer. Partition, account, the
# software environment and extra sbatch options per kind of job (KOLM_SBATCH_TRAIN,
# KOLM_SBATCH_CPU, KOLM_SBATCH_EVAL) come from slurm/site.sh, applied by slurm/submit. With --eval-tasks, every checkpoint
# of the run is scored with those lm-evaluation-harness tasks after training (slurm/eval.sbatch).
# Prints the job ids; each job waits for the previous one to succeed (afterok), so a failure
# stops the chain.
set -euo pipefail
KOLM_HOME=$(dirname "$(dirname "$(readlink -f "$0")")")
export KOLM_HOME
# shellcheck source=site.sh
source "$KOLM_HOME/slurm/site.sh"
submit() { "$KOLM_HOME/slurm/submit" --parsable "$@"; }

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
recipe= tokenizer= vocab= shards= out= tasks=4 nodes= time= eval_tasks= clean= clean_tasks=4 documents=() inputs=() overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --recipe) recipe=$2; shift 2 ;;
    --input) shift; while [[ $# -gt 0 && $1 != --* ]]; do inputs+=("$1"); shift; done ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    --vocab-size) vocab=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --shard-tasks) tasks=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --eval-tasks) eval_tasks=$2; shift 2 ;;
    --clean) clean=$2; shift 2 ;;
    --clean-tasks) clean_tasks=$2; shift 2 ;;
    --documents) documents=(--documents "$2"); shift 2 ;;
    --) shift; overrides=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "pipeline: unknown option $1" >&2; usage ;;
  esac
done
for v in recipe tokenizer shards out; do
  [[ -n ${!v} ]] || { echo "pipeline: --$v is required" >&2; usage; }
done
[[ ${#inputs[@]} -gt 0 ]] || { echo "pipeline: --input is required" >&2; usage; }
overrides+=("data=$shards" "tokenizer=$tokenizer")

# The run directory, from the recipe and overrides; this also catches recipe typos before
# anything is queued.
# shellcheck disable=SC2086  # KOLM_CONTAINER is a command prefix: split on purpose
run_dir=$($KOLM_CONTAINER "$KOLM_PYTHON" -c 'import sys; from kolm.train.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).run_dir)' "$recipe" "${overrides[@]}")

dep=()
if [[ -n $clean ]]; then
  clean_job=$(submit --array="0-$((clean_tasks - 1))" "$KOLM_HOME/slurm/clean.sbatch" \
    --input "${inputs[@]}" "${documents[@]}" --out "$clean")
  echo "clean:     job $clean_job (array of $clean_tasks; report in $clean/report.json)"
  dep=(--dependency="afterok:$clean_job")
  inputs=("$clean") documents=()  # the cleaned corpus is JSON lines, one document each
fi
if [[ ! -e $tokenizer ]]; then
  [[ -n $vocab ]] || { echo "pipeline: $tokenizer does not exist; give --vocab-size to train it first" >&2; exit 2; }
  tok_job=$(submit "${dep[@]}" "$KOLM_HOME/slurm/tokenizer.sbatch" --input "${inputs[@]}" "${documents[@]}" \
    --vocab-size "$vocab" --out "$tokenizer")
  echo "tokenizer: job $tok_job"
  dep=(--dependency="afterok:$tok_job")
fi
shard_job=$(submit "${dep[@]}" --array="0-$((tasks - 1))" "$KOLM_HOME/slurm/shard.sbatch" \
  --input "${inputs[@]}" "${documents[@]}" --tokenizer "$tokenizer" --out "$shards")
echo "shard:     job $shard_job (array of $tasks)"
merge_job=$(submit --dependency="afterok:$shard_job" "$KOLM_HOME/slurm/shard.sbatch" \
  merge "$shards")
echo "merge:     job $merge_job"
train_opts=()
[[ -n $nodes ]] && train_opts+=(--nodes="$nodes")
[[ -n $time ]] && train_opts+=(--time="$time")
train_job=$(submit "${train_opts[@]}" --dependency="afterok:$merge_job" "$KOLM_HOME/slurm/pretrain.sbatch" \
  "$recipe" "${overrides[@]}")
echo "pretrain:  job $train_job (log kolm-pretrain-$train_job.out, run directory $run_dir)"
convert_job=$(submit --dependency="afterok:$train_job" "$KOLM_HOME/slurm/convert.sbatch" \
  "$run_dir" --out "$out")
echo "convert:   job $convert_job (model in $out)"
jobs="${clean_job:+$clean_job }$shard_job $merge_job $train_job $convert_job"
if [[ -n $eval_tasks ]]; then
  eval_job=$(submit --dependency="afterok:$train_job" "$KOLM_HOME/slurm/eval.sbatch" \
    "$run_dir" "$eval_tasks")
  echo "eval:      job $eval_job ($eval_tasks on every checkpoint; results in $run_dir/metrics.jsonl)"
  jobs="$jobs $eval_job"
fi
echo "follow with: squeue -u ${USER:-$(id -un)}    cancel all: scancel $jobs"
