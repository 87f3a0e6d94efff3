"""The cluster launchers on a real 2-node Slurm cluster (tools/local-slurm.sh): time limits,
preemption and scancel with sbatch and submitit, array sharding, and the whole pipeline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.dist import train_records, train_to_end, wait_for, write_recipe
from helpers.slurm_cluster import (
    CLUSTER,
    REPO,
    finished,
    job,
    job_processes,
    restarted,
    sbatch,
    scontrol,
    signal_all,
    signalled,
    start_cluster,
    time_limit_due,
    wait_job,
)

from kolm.train.checkpoint import complete_checkpoints

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root (tools/local-slurm.sh)"),
]

SLURM_RUN = {"train_steps": 90, "save_every": 10, "eval_every": 45, "log_every": 5}
# The time-limit tests do not race the clock: once training has logged a step its processes are
# frozen (SIGSTOP), the job's limit is moved so that Slurm's warning (WARNING_S before it) is due,
# and they go on only once the warning has been sent; on any machine, fast or loaded, the warning
# meets a run in progress, with WARNING_S left to checkpoint.
WARNING_S = 150
CPU_TASKS = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return start_cluster()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, tokenizer_dir):
    """The same run, uninterrupted, on 2 local ranks: what every Slurm run must reproduce."""
    root = tmp_path_factory.mktemp("slurm-reference")
    train_to_end(root, shards, tokenizer_dir, **SLURM_RUN)
    return root / "run"


def _losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(run_dir)]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = _losses(run_dir), _losses(reference)
    assert [s for s, _, _ in got] == list(range(1, SLURM_RUN["train_steps"] + 1))
    assert got == want  # same samples, same losses, step by step
    assert train_records(run_dir, "eval")[-1]["eval_loss"] == train_records(reference, "eval")[-1]["eval_loss"]


def _extend_time_limit_after_first_requeue(env: dict, job_id: str, log: Path) -> dict:
    """The job requeued itself once; let the next attempt finish instead of requeueing again."""
    info = wait_job(env, job_id, restarted, 300, "requeue itself at its time limit", log)
    scontrol(env, "update", f"JobId={job_id}", "TimeLimit=15")
    return info


def test_local_cluster_start_is_idempotent(cluster):
    proc = subprocess.run([str(REPO / "tools/local-slurm.sh"), "start", "--nodes", "2"], capture_output=True,
                          text=True, env={**os.environ, **CLUSTER})
    assert proc.returncode == 0 and "already running" in proc.stderr
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=cluster, capture_output=True, text=True).stdout
    states = dict(line.split() for line in nodes.splitlines())
    assert set(states) == {"kolm-t1", "kolm-t2"} and set(states.values()) <= {"idle", "mix", "alloc"}, nodes


def _freeze_until_warned(env: dict, job_id: str, run_dir: Path, marker: bytes, warned, log: Path) -> None:
    """Freeze the job's training processes after its first logged step, bring its time limit near,
    and let them go once ``warned(pids)`` says Slurm's warning has been sent."""
    wait_for(lambda: bool(train_records(run_dir)), 300, "the first step")
    pids = job_processes(job_id, marker)
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for pid in pids}
    assert len(pids) == 2, (commands, log.read_text(errors="replace")[-2000:] if log.exists() else "")
    signal_all(pids, signal.SIGSTOP)
    try:
        time_limit_due(env, job_id, WARNING_S)
        wait_for(lambda: warned(pids), 180, "Slurm's time-limit warning")
    finally:
        signal_all(pids, signal.SIGCONT)


def test_sbatch_requeues_at_time_limit_and_resumes_to_the_same_result(tmp_path, cluster, shards, tokenizer_dir,
                                                                     reference):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", **SLURM_RUN)
    job_id = sbatch(cluster, "--nodes=2", *CPU_TASKS, "--time=15", f"--signal=B:USR1@{WARNING_S}",
                    REPO / "slurm/pretrain.sbatch", recipe, cwd=tmp_path)
    log = tmp_path / f"kolm-pretrain-{job_id}.out"
    _freeze_until_warned(cluster, job_id, tmp_path / "run", b"kolm\0train", lambda _: "time limit near" in
                         log.read_text(errors="replace"), log)
    _extend_time_limit_after_first_requeue(cluster, job_id, log)
    info = wait_job(cluster, job_id, finished, 600, "finish", log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "time limit near" in text and f"requeueing job {job_id}" in text
    # Every rank left cleanly with 75, none killed by srun --kill-on-bad-exit while closing down.
    assert "kolm: task 0 on" in text and "kolm: task 1 on" in text and text.count("exit 75 (checkpoint written") == 2
    assert "resuming from global_step" in text
    assert "srun" not in text.split("kolm: job", 1)[0]  # nothing failed before the first start
    _assert_same_run(tmp_path / "run", reference)


def test_preemption_by_scontrol_requeue_is_survived(tmp_path, cluster, shards, tokenizer_dir, reference):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", **SLURM_RUN)
    job_id = sbatch(cluster, "--nodes=2", *CPU_TASKS, "--time=15", REPO / "slurm/pretrain.sbatch", recipe,
                    cwd=tmp_path)
    log = tmp_path / f"kolm-pretrain-{job_id}.out"
    wait_for(lambda: complete_checkpoints(tmp_path / "run" / "checkpoints") or finished(job(cluster, job_id)), 300,
             "the first checkpoint")
    trainers = job_processes(job_id, b"kolm\0train")
    signal_all(trainers, signal.SIGSTOP)  # still running when the preemption comes, however fast the machine
    scontrol(cluster, "requeue", job_id)
    info = wait_job(cluster, job_id, finished, 600, "finish after the preemption", log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text[-4000:]
    assert "resuming from global_step" in text
    _assert_same_run(tmp_path / "run", reference)


def test_scancel_ends_the_job_without_requeue(tmp_path, cluster, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", **SLURM_RUN)
    job_id = sbatch(cluster, "--nodes=2", *CPU_TASKS, "--time=15", REPO / "slurm/pretrain.sbatch", recipe,
                    cwd=tmp_path)
    log = tmp_path / f"kolm-pretrain-{job_id}.out"
    deadline = time.monotonic() + 300
    while not train_records(tmp_path / "run"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=cluster, check=True)
    info = wait_job(cluster, job_id, finished, 120, "end after scancel", log)
    time.sleep(15)  # longer than the cluster's requeue hold: a requeue would show by now
    info = job(cluster, job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert "requeueing" not in log.read_text(errors="replace")


def container_probe(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for `apptainer exec IMAGE`: records each command it runs, then runs it."""
    probe, log = tmp_path / "container.sh", tmp_path / "container.log"
    probe.write_text(f'#!/bin/bash\necho "$*" >> {log}\nexec "$@"\n')
    probe.chmod(0o755)
    return probe, log


def test_submitit_launcher_runs_two_nodes_across_a_timeout(tmp_path, cluster, shards, tokenizer_dir, reference):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", **SLURM_RUN)
    logs = tmp_path / "submitit"
    probe, probe_log = container_probe(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "15", "--signal-delay", str(WARNING_S), "--log-dir", str(logs)],
        env={**cluster, "KOLM_CONTAINER": str(probe)}, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[2]
    assert f"tail -f {logs}/{job_id}/{job_id}_0_log.err" in proc.stdout
    log = logs / job_id / f"{job_id}_0_log.err"
    # submitit's warning (USR2) goes to the tasks themselves (with a SIGCONT from Slurm).
    _freeze_until_warned(cluster, job_id, tmp_path / "run", b"submitit.core._submit",
                         lambda pids: all(signalled(pid, signal.SIGUSR2) for pid in pids), log)
    _extend_time_limit_after_first_requeue(cluster, job_id, log)
    info = wait_job(cluster, job_id, finished, 600, "finish", log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "received SIGUSR2" in text and "resuming from global_step" in text
    import submitit

    assert submitit.SlurmJob(logs / "%j", job_id, tasks=(0,)).result()["status"] == "finished"
    _assert_same_run(tmp_path / "run", reference)
    # A task that fails ends the others instead of leaving them blocked in a collective.
    assert "srun --unbuffered" in (logs / job_id / f"{job_id}_submission.sh").read_text()
    assert "--kill-on-bad-exit=1" in (logs / job_id / f"{job_id}_submission.sh").read_text()
    # Every task of both attempts ran inside the "container".
    assert probe_log.read_text().count(f"{sys.executable} -u -m submitit.core._submit") >= 4


def test_submit_rejects_a_bad_recipe_before_queueing(tmp_path, cluster, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", lr_warmup=3)
    proc = subprocess.run([sys.executable, "-m", "launch.submit", "--config", str(recipe), "--gpus-per-node", "0",
                           "--log-dir", str(tmp_path / "logs")], env=cluster, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "lr_warmup" in proc.stderr
    assert not (tmp_path / "logs").exists()


def _shard_files(out: Path) -> dict[str, tuple[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["path"]: (s["bin_sha256"], s["idx_sha256"]) for s in manifest["shards"]}


def test_array_sharding_job_matches_a_single_run(tmp_path, cluster, korean_corpus, tokenizer_dir, shards):
    out = tmp_path / "shards"
    array = sbatch(cluster, "--array=0-1", "--cpus-per-task=1", REPO / "slurm/shard.sbatch", "--input",
                   korean_corpus, "--tokenizer", tokenizer_dir, "--out", out, "--valid-fraction", "0.05",
                   cwd=tmp_path)
    merge = sbatch(cluster, f"--dependency=afterok:{array}", "--cpus-per-task=1", REPO / "slurm/shard.sbatch",
                   "merge", out, cwd=tmp_path)
    info = wait_job(cluster, merge, finished, 300, "merge the array's shards", tmp_path / f"kolm-shard-{merge}.out")
    logs = "".join(p.read_text() for p in tmp_path.glob("kolm-shard-*.out"))
    assert info["JobState"] == "COMPLETED", logs[-3000:]
    assert _shard_files(out) == _shard_files(shards)
    for shard in _shard_files(out):
        for ext in (".bin", ".idx"):
            assert (out / shard).with_suffix(ext).read_bytes() == (shards / shard).with_suffix(ext).read_bytes()


def test_pipeline_goes_from_corpus_to_a_converted_model(tmp_path, cluster, korean_corpus):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", tmp_path / "unused", tmp_path / "run",
                          train_steps=6, save_every=3, eval_every=6, eval_samples=16)
    probe, probe_log = container_probe(tmp_path)
    env = {**cluster, "KOLM_SBATCH_TRAIN": " ".join(CPU_TASKS), "KOLM_SBATCH_CPU": "--cpus-per-task=1 --mem=1G",
           "KOLM_SBATCH_EVAL": "--gpus-per-node=0 --cpus-per-task=1", "KOLM_CONTAINER": str(probe)}

    def pipeline(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / "slurm/pipeline.sh"), "--recipe", str(recipe), "--input", str(korean_corpus),
             "--tokenizer", "tokenizer", "--vocab-size", "1000", "--shards", "shards", "--out", "model",
             "--shard-tasks", "2", "--nodes", "2", "--eval-tasks", "ko_constitution_cloze", "--", *overrides],
            env=env, cwd=tmp_path, capture_output=True, text=True)

    typo = pipeline("eval_sample=16")
    assert typo.returncode != 0 and "eval_sample" in typo.stderr  # a recipe typo queues nothing
    assert not list(tmp_path.glob("kolm-*.out")) and not (tmp_path / "shards").exists()
    proc = pipeline()
    assert proc.returncode == 0, proc.stderr
    jobs = {line.split(":")[0]: line.split()[2] for line in proc.stdout.splitlines() if " job " in line}
    assert set(jobs) == {"tokenizer", "shard", "merge", "pretrain", "convert", "eval"}, proc.stdout
    info = wait_job(cluster, jobs["convert"], finished, 900, "run the whole chain")
    assert wait_job(cluster, jobs["eval"], finished, 600, "score the checkpoints")["JobState"] == "COMPLETED"
    assert [r["step"] for r in train_records(tmp_path / "run", "harness")] == [3, 6]
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs[-5000:]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architectures"] == ["PhiForCausalLM"]
    ran = probe_log.read_text()
    for command in ("kolm tokenizer train", "kolm shard --workers", "kolm shard merge", "kolm train --config",
                    "kolm convert", "kolm eval"):
        assert f"{sys.executable} -m {command}" in ran, ran  # every job ran inside the "container"
    generated = subprocess.run([sys.executable, "-m", "kolm", "generate", str(tmp_path / "model"), "헌법",
                                "--max-new-tokens", "5"], env={**cluster, "HF_HUB_OFFLINE": "1"},
                               capture_output=True, text=True)
    assert generated.returncode == 0 and "헌법" in generated.stdout, generated.stderr


def test_eval_job_scores_every_checkpoint_once_and_can_be_resubmitted(tmp_path, cluster, reference_run):
    source, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    steps = sorted(c.step for c in complete_checkpoints(run_dir / "checkpoints"))
    logs = []
    for _ in range(2):  # the second submission finds nothing left to do
        job_id = sbatch(cluster, "--gpus-per-node=0", "--cpus-per-task=1", REPO / "slurm/eval.sbatch", run_dir,
                        "ko_constitution_cloze", "--limit", "4", cwd=tmp_path)
        log = tmp_path / f"kolm-eval-{job_id}.out"
        info = wait_job(cluster, job_id, finished, 600, "evaluate", log)
        logs.append(log.read_text(errors="replace"))
        assert info["JobState"] == "COMPLETED", logs[-1][-3000:]
    records = train_records(run_dir, "harness")
    assert [r["step"] for r in records] == steps and all(r["task"] == "ko_constitution_cloze" for r in records)
    assert "ko_constitution_cloze" in logs[0] and "nothing to evaluate" in logs[1]


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"SLURM_PROCID=")).split(b"=", 1)[1])


def test_a_frozen_rank_is_reported_and_the_job_requeues_to_the_same_result(tmp_path, cluster, shards, tokenizer_dir,
                                                                        reference_run):
    reference, _ = reference_run  # 12 steps, checkpoints every 4
    hang = 20
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", hang_timeout=hang)
    job_id = sbatch(cluster, "--nodes=2", *CPU_TASKS, "--time=15", REPO / "slurm/pretrain.sbatch", recipe,
                    cwd=tmp_path)
    log = tmp_path / f"kolm-pretrain-{job_id}.out"
    wait_for(lambda: len(train_records(tmp_path / "run")) >= 5 or finished(job(cluster, job_id)), 300, "step 5")
    trainers = job_processes(job_id, b"kolm\0train")
    assert len(trainers) == 2, log.read_text(errors="replace")[-3000:]
    signal_all([pid for pid in trainers if _rank_of(pid) == 1], signal.SIGSTOP)  # rank 1, on the second node
    info = wait_job(cluster, job_id, restarted, hang + 120, "requeue itself after the hang", log)
    info = wait_job(cluster, job_id, finished, 600, "finish after the requeue", log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text[-4000:]
    assert "task 0 on kolm-t1: exit 5 (hang" in text and f"requeue job {job_id} (restart 1)" in text
    assert "no report from rank 1: look there first" in text and "resuming from global_step" in text
    from kolm.train.hang import read_reports

    reporters = {r.rank: r for r in read_reports(tmp_path / "run")}
    assert 0 in reporters and reporters[0].host == "kolm-t1", reporters
    assert _losses(tmp_path / "run") == _losses(reference)


def test_submitit_job_with_a_frozen_rank_requeues_to_the_same_result(tmp_path, cluster, shards, tokenizer_dir,
                                                                     reference_run):
    reference, _ = reference_run
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", hang_timeout=20)
    logs = tmp_path / "submitit"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "15", "--log-dir", str(logs)], env=cluster, cwd=REPO, capture_output=True,
        text=True)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[2]
    log = logs / job_id / f"{job_id}_0_log.err"
    wait_for(lambda: len(train_records(tmp_path / "run")) >= 5 or finished(job(cluster, job_id)), 300, "step 5")
    tasks = job_processes(job_id, b"submitit.core._submit")
    assert len(tasks) == 2, log.read_text(errors="replace")[-3000:] if log.exists() else ""
    signal_all([pid for pid in tasks if _rank_of(pid) == 1], signal.SIGSTOP)
    wait_job(cluster, job_id, restarted, 140, "requeue itself after the hang", log)
    info = wait_job(cluster, job_id, finished, 600, "finish after the requeue", log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text[-4000:]
    assert f"kolm: hang: requeueing job {job_id} (restart 1)" in text and "resuming from global_step" in text
    import submitit

    assert submitit.SlurmJob(logs / "%j", job_id, tasks=(0,)).result()["status"] == "finished"
    assert _losses(tmp_path / "run") == _losses(reference)
