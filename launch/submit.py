"""Submit `kolm train` (and evaluation of its checkpoints) to Slurm with submitit, from the command
line or from Python.

    python -m launch.submit --config RECIPE.yaml --nodes 2 --gpus-per-node 8 [key=value ...]
    python -m launch.submit --eval RUN_DIR --tasks kobest_boolq,kobest_copa --gpus-per-node 1

    from launch.submit import SubmitOptions, submit, submit_eval
    job = submit("recipes/phi-1_5-ko.yaml", ["train_steps=1000"], SubmitOptions(nodes=2))
    job = submit_eval("runs/phi-1_5-ko", ["kobest_boolq"])

One task per GPU, each running the trainer in-process. Near the time limit Slurm sends USR2 to
every task (submitit's `slurm_signal_delay_s`); kolm's graceful stop catches it on all ranks,
writes one checkpoint collectively, and only then hands over to submitit, whose handler requeues
the job from global rank 0 (submitit calls `checkpoint()` on rank 0 only, so a ZeRO save inside
it would hang). The requeued job resumes from the newest complete checkpoint. `scancel` and
preemption send SIGTERM: the trainer checkpoints and stops; a preempted job is requeued by Slurm.
A hang (a rank saw no training progress for hang_timeout seconds, wrote its stacks to
RUN_DIR/hangs/ and exits 5) is treated like a preemption: that rank requeues the job before it
exits, at most `max_requeues` restarts in all.
Partition and account default to SBATCH_PARTITION / SBATCH_ACCOUNT, the tasks' interpreter and
container to KOLM_PYTHON / KOLM_CONTAINER (else this interpreter), and every job sources
slurm/site.sh first, so cluster settings stay in the one place the sbatch scripts use.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def site_script() -> str | None:
    """The cluster settings every job sources first: $KOLM_HOME/slurm/site.sh when KOLM_HOME is set,
    else the site.sh of the checkout this launcher was imported from. An installed kolm outside a
    checkout has none; then the submitting shell's environment (sbatch exports it) is all there is."""
    home = os.environ.get("KOLM_HOME")
    candidates = [Path(home)] if home else [Path(__file__).resolve().parent.parent, Path.cwd()]
    found = next((c / "slurm" / "site.sh" for c in candidates if (c / "slurm" / "site.sh").is_file()), None)
    return str(found) if found else None


@dataclass
class SubmitOptions:
    """Every default of a submission, in one place."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU (one when there are none)
    cpus_per_task: int = 8
    mem_gb: int | None = None
    partition: str | None = field(default_factory=lambda: os.environ.get("SBATCH_PARTITION"))
    account: str | None = field(default_factory=lambda: os.environ.get("SBATCH_ACCOUNT"))
    time_min: int = 24 * 60
    signal_delay_s: int = 300  # checkpoint this long before the time limit
    max_requeues: int = 50  # time-limit requeues (submitit's count) and hang requeues (Slurm's restart count)
    sbatch: dict[str, str] = field(default_factory=dict)  # extra #SBATCH parameters
    cluster: str | None = None  # slurm, local or debug; None: slurm when sbatch exists, else local
    log_dir: str = "submitit-logs"
    job_name: str = "kolm-pretrain"
    site: str | None = field(default_factory=site_script)  # slurm/site.sh, sourced by every job
    # The interpreter every task runs, and a command prefix (a container), as in slurm/site.sh.
    python: str = field(default_factory=lambda: os.environ.get("KOLM_PYTHON") or sys.executable)
    container: str = field(default_factory=lambda: os.environ.get("KOLM_CONTAINER", ""))

    def validate(self) -> None:
        for name in ("nodes", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be 0 or more, got {self.gpus_per_node}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(f"signal_delay_s={self.signal_delay_s} leaves no time to train within "
                             f"time_min={self.time_min}; use a longer time or a shorter delay")
        if self.cluster not in (None, "slurm", "local", "debug"):
            raise ValueError(f"cluster must be slurm, local or debug, got {self.cluster!r}")
        if self.cluster in ("local", "debug") and self.nodes != 1:
            raise ValueError(f"--cluster {self.cluster} runs on this machine only: use --nodes 1")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


class KolmTrain:
    """The job submitit runs on every task: `kolm train --config RECIPE [overrides]`."""

    def __init__(self, config: str, overrides: list[str], max_requeues: int = SubmitOptions.max_requeues):
        self.config = config
        self.overrides = list(overrides)
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from kolm.train.signals import GracefulStop

        # Replaces submitit's USR2/TERM handlers until training returns.
        stop = GracefulStop()
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from kolm.train.config import load_config
        from kolm.train.loop import train
        from kolm.train.signals import EXIT_REQUEUE

        code = train(load_config(self.config, self.overrides), stop, on_hang=self._requeue_after_hang)
        stop.restore()  # submitit's handlers again: its USR2 handler requeues below
        if code == 0:
            return {"status": "finished", "config": self.config}
        if code == EXIT_REQUEUE and signal.SIGUSR2 in stop.received:
            self._hand_over_to_submitit()
        name = ", ".join(signal.Signals(s).name for s in stop.received) or "an error"
        raise RuntimeError(f"kolm train exited with status {code} (stopped by {name}); see the log above")

    @staticmethod
    def _hand_over_to_submitit() -> None:
        """Every rank has checkpointed: let submitit's USR2 handler requeue the job from rank 0."""
        signal.raise_signal(signal.SIGUSR2)  # rank 0: checkpoint() + scontrol requeue + exit
        # Other ranks return from submitit's handler; the requeue's SIGTERM ends them (submitit
        # would ignore it, which holds the requeue back until Slurm's KillWait runs out).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(600)

    def _requeue_after_hang(self) -> None:
        """This rank found a hang and is about to exit 5: requeue the job, as a preemption would."""
        import subprocess

        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            print(f"kolm: hang: not requeueing job {job}: already restarted {restarts} times (max_requeues)",
                  file=sys.stderr)
            return
        print(f"kolm: hang: requeueing job {job} (restart {restarts + 1})", file=sys.stderr)
        # A second rank's request meets a job that is already requeueing, and changes nothing.
        subprocess.run(["scontrol", "requeue", job], capture_output=True, check=False)

    def checkpoint(self) -> object:
        import submitit

        # Nothing to save here (the trainer already did, on all ranks); the new job finds the
        # newest complete checkpoint in the run directory by itself.
        return submitit.helpers.DelayedSubmission(KolmTrain(self.config, self.overrides, self.max_requeues))


def make_executor(opts: SubmitOptions):
    import shutil

    import submitit

    cluster = opts.cluster or ("slurm" if shutil.which("sbatch") else "local")
    # The tasks unpickle the job, so they must run a Python that imports this same kolm.
    python = " ".join(filter(None, [opts.container, shlex.quote(opts.python)]))
    executor = submitit.AutoExecutor(folder=str(Path(opts.log_dir) / "%j"), cluster=cluster,
                                     slurm_max_num_timeout=opts.max_requeues, slurm_python=python,
                                     local_python=python)
    params = dict(name=opts.job_name, timeout_min=opts.time_min, nodes=opts.nodes,
                  tasks_per_node=opts.ntasks_per_node, cpus_per_task=opts.cpus_per_task)
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if cluster == "slurm":
        # One task failing (a bad shard, an OOM) ends the others at once, as srun in
        # slurm/pretrain.sbatch does, instead of leaving them blocked in a collective.
        params.update(slurm_signal_delay_s=opts.signal_delay_s, slurm_srun_args=["--kill-on-bad-exit=1"],
                      slurm_setup=[f"source {shlex.quote(opts.site)}"] if opts.site else [],
                      slurm_additional_parameters=dict(opts.sbatch))
        if opts.partition:
            params["slurm_partition"] = opts.partition
        if opts.account:
            params["slurm_account"] = opts.account
    executor.update_parameters(**params)
    return executor


def submit(config: str, overrides: list[str], opts: SubmitOptions | None = None):
    """Validate the recipe here, then submit; returns the submitit Job."""
    opts = opts or SubmitOptions()
    opts.validate()
    from kolm.train.config import load_config

    load_config(config, overrides)  # a typo fails now, not after the job waited in the queue
    config = str(Path(config).resolve())
    return make_executor(opts).submit(KolmTrain(config, overrides, opts.max_requeues))


class KolmEval:
    """The job for `--eval`: lm-evaluation-harness tasks on every checkpoint of a run not yet scored."""

    def __init__(self, run_dir: str, tasks: list[str], limit: int | None, include_path: str | None):
        self.run_dir, self.tasks, self.limit, self.include_path = run_dir, tasks, limit, include_path

    def __call__(self) -> dict:
        from kolm.export.harness import HarnessOptions, run_harness

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        results = run_harness(self.run_dir, HarnessOptions(self.tasks, self.include_path, self.limit, pending=True))
        return {"status": "finished", "evaluated": [r.step for r in results]}


def submit_eval(run_dir: str, tasks: list[str], opts: SubmitOptions | None = None, limit: int | None = None,
                include_path: str | None = None):
    """Submit harness evaluation of a run's pending checkpoints (one task, one GPU unless opts say)."""
    opts = opts or SubmitOptions(gpus_per_node=1, tasks_per_node=1, job_name="kolm-eval")
    opts.validate()
    if not Path(run_dir).is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    if not tasks:
        raise ValueError("--tasks needs at least one task name")
    include = str(Path(include_path).resolve()) if include_path else None
    return make_executor(opts).submit(KolmEval(str(Path(run_dir).resolve()), tasks, limit, include))


def _sbatch_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--sbatch takes KEY=VALUE (for example qos=high), got {text!r}")
    return key.lstrip("-").replace("-", "_"), value


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, SubmitOptions]:
    d = SubmitOptions()
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="recipe YAML: submit training")
    what.add_argument("--eval", metavar="RUN_DIR", help="submit lm-evaluation-harness tasks (--tasks) on every "
                                                        "checkpoint of RUN_DIR not yet scored")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    p.add_argument("--tasks", type=lambda t: [n for n in t.split(",") if n], default=[], help="with --eval")
    p.add_argument("--limit", type=int, default=None, help="with --eval: examples per task")
    p.add_argument("--include-path", default=None, help="with --eval: your task YAML files")
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="0 on CPU-only nodes")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU")
    p.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task)
    p.add_argument("--mem-gb", type=int, default=None)
    p.add_argument("--partition", default=d.partition, help="default: $SBATCH_PARTITION")
    p.add_argument("--account", default=d.account, help="default: $SBATCH_ACCOUNT")
    p.add_argument("--time", dest="time_min", type=int, default=d.time_min, help="time limit in minutes")
    p.add_argument("--signal-delay", dest="signal_delay_s", type=int, default=d.signal_delay_s,
                   help="seconds before the time limit at which to checkpoint and requeue")
    p.add_argument("--max-requeues", type=int, default=d.max_requeues)
    p.add_argument("--sbatch", type=_sbatch_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH parameter (repeatable), e.g. --sbatch qos=high")
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="local: subprocesses on this machine; debug: in this process (default: slurm if available)")
    p.add_argument("--log-dir", default=d.log_dir)
    p.add_argument("--job-name", default=d.job_name)
    p.add_argument("--wait", action="store_true", help="wait for the job to end and exit with its status")
    a = p.parse_args(argv)
    opts = SubmitOptions(nodes=a.nodes, gpus_per_node=a.gpus_per_node, tasks_per_node=a.tasks_per_node,
                         cpus_per_task=a.cpus_per_task, mem_gb=a.mem_gb, partition=a.partition,
                         account=a.account, time_min=a.time_min, signal_delay_s=a.signal_delay_s,
                         max_requeues=a.max_requeues, sbatch=dict(a.sbatch), cluster=a.cluster,
                         log_dir=a.log_dir, job_name=a.job_name)
    return a, opts


def main(argv: list[str] | None = None) -> int:
    from kolm.errors import KolmError

    args, opts = parse_args(argv)
    try:
        if args.eval:
            if args.tasks_per_node is None:
                opts.tasks_per_node = 1  # one process evaluates; the GPU count is the node's
            job = submit_eval(args.eval, args.tasks, opts, args.limit, args.include_path)
        else:
            job = submit(args.config, args.overrides, opts)
    except (KolmError, ValueError) as e:
        print(f"launch.submit: error: {e}", file=sys.stderr)
        return 2
    folder = Path(opts.log_dir) / str(job.job_id)
    print(f"submitted job {job.job_id}")
    print(f"  logs:    {folder}/{job.job_id}_0_log.out (and _log.err; one pair per task)")
    print(f"  follow:  tail -f {folder}/{job.job_id}_0_log.err")
    if type(job).__name__ == "SlurmJob":
        print(f"  status:  squeue -j {job.job_id}    cancel: scancel {job.job_id}")
    if not args.wait:
        return 0
    try:
        result = job.results()[0]  # one result per task; global rank 0 speaks for the job
    except Exception as e:  # submitit re-raises the task's failure with its traceback
        print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id}: {result['status']}" + (f", evaluated steps {result['evaluated']}" if "evaluated" in
                                                      result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
