# kolm's cluster-specific settings: the one file to edit for your cluster.
# Every job script in slurm/ sources it at the start of the job (on the first node, before srun),
# and slurm/pipeline.sh sources it before submitting. Values already set in the environment win,
# so one-off changes need no edit: KOLM_PYTHON=/opt/venv/bin/python sbatch slurm/pretrain.sbatch ...

# --- Where jobs go. sbatch reads these at submission (same as -p / -A / --qos on the command line).
# export SBATCH_PARTITION=gpu
# export SBATCH_ACCOUNT=my-project
# export SBATCH_QOS=normal

# --- Extra sbatch options slurm/pipeline.sh adds to its jobs (they override the scripts' #SBATCH
# lines). Training jobs, e.g. "--gpus-per-node=4 --ntasks-per-node=4" on 4-GPU nodes; CPU jobs
# (tokenizer, shard, merge, convert), e.g. "--cpus-per-task=64 --mem=128G".
export KOLM_SBATCH_TRAIN=${KOLM_SBATCH_TRAIN:-}
export KOLM_SBATCH_CPU=${KOLM_SBATCH_CPU:-}
# lm-evaluation-harness jobs (slurm/eval.sbatch asks for one GPU), e.g. "--gpus-per-node=0" on CPU nodes.
export KOLM_SBATCH_EVAL=${KOLM_SBATCH_EVAL:-}

# --- Hugging Face cache on the compute nodes (lm-evaluation-harness datasets, e.g. kobest, kmmlu):
# download them once where there is internet, into this cache; the eval jobs read it offline.
# export HF_HOME=/shared/hf-cache

# --- Software environment on the compute nodes.
# module load cuda/12.4 nccl
# source /path/to/venv/bin/activate
export KOLM_PYTHON=${KOLM_PYTHON:-python3}
# Run every task inside a container, e.g. "apptainer exec --nv /images/kolm.sif" (empty: none).
export KOLM_CONTAINER=${KOLM_CONTAINER:-}

# --- Networking for NCCL between nodes (uncomment what your fabric needs).
# export NCCL_SOCKET_IFNAME=ib0          # the interface the nodes reach each other on
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_DEBUG=WARN
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Threads per task for CPU work (data loading, CPU optimizer offload).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}

# --- Requeue policy of slurm/pretrain.sbatch.
# How many times a training job may requeue itself (at its time limit, or after a hang) before it gives up.
export KOLM_MAX_REQUEUES=${KOLM_MAX_REQUEUES:-50}
