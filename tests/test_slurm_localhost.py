"""python -m slurm against a real single-node SLURM on localhost (slurm/localhost.py installs and starts
it): a 2-rank CPU job trains exactly like torchrun, a USR1 mid-run checkpoints, requeues and resumes
to the same losses, and pretrain -> sft run in order through a dependency.

Skipped only when SLURM cannot be installed here (no root or no apt-get).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_curves, pretrain_args, read_metrics, run_cli, training_steps
from slurm.localhost import LocalSlurm, Unavailable, install

pytestmark = pytest.mark.slurm
STEPS = 10  # ~0.5 s each on 2 cores: a signal sent after step 2 lands mid-run
CPU_JOB = ["slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1", "slurm.time=00:15:00"]


@pytest.fixture(scope="module")  # stopped before tests/test_slurm_multinode.py starts its own cluster
def cluster(tmp_path_factory):
    try:
        install()
    except Unavailable as e:
        pytest.skip(f"no SLURM on localhost: {e}")
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2) as c:
        yield c


def run_args(corpus, run_dir):
    return pretrain_args(corpus, run_dir, steps=STEPS, **{"logging.wandb": "disabled"})


def submit(*args) -> list[str]:
    """`python -m slurm ...` for a 2-rank CPU job; the job ids it printed."""
    proc = subprocess.run([sys.executable, "-m", "slurm", *map(str, args), *CPU_JOB], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env=dict(os.environ, WANDB_MODE="disabled"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def log(run_dir, stage, job) -> str:
    return (Path(run_dir) / "slurm" / f"{stage}-{job}.out").read_text()


@pytest.fixture(scope="module")
def torchrun_curve(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchrun")
    run_cli(*run_args(corpus, run_dir), nproc=2)
    return run_dir / "pretrain"


@pytest.fixture(scope="module")
def chain(cluster, corpus, tmp_path_factory):
    """pretrain, then SFT from its checkpoint (--dependency=afterok): job ids, their dependency as
    submitted and their final `scontrol show job` fields."""
    run_dir = tmp_path_factory.mktemp("chain")
    sft = ["sft.data=data/instruct/chat.jsonl", "sft.steps=3", "sft.seq_len=128", "sft.micro_batch_size=2",
           "sft.global_batch_size=4", "sft.log_every=1", "sft.eval_batches=1"]
    jobs = submit(*run_args(corpus, run_dir), *sft, "--stages", "pretrain,sft")
    dependency = cluster.job(jobs[1])["Dependency"]
    return run_dir, jobs, dependency, [cluster.wait(job, timeout=300) for job in jobs]


def test_cpu_job_trains_like_torchrun(chain, torchrun_curve):
    run_dir, jobs, _, (pretrain, _) = chain
    assert pretrain["JobState"] == "COMPLETED", log(run_dir, "pretrain", jobs[0])
    assert len(training_steps(run_dir / "pretrain")) == STEPS
    assert_same_curves(run_dir / "pretrain", torchrun_curve, 1e-6, 1e-6)


def test_stages_run_in_dependency_order(chain):
    run_dir, (first, second), dependency, (pretrain, sft) = chain
    assert dependency.startswith(f"afterok:{first}"), dependency
    assert sft["JobState"] == "COMPLETED", log(run_dir, "sft", second)
    assert sft["StartTime"] >= pretrain["EndTime"], (pretrain, sft)  # ISO times sort as strings
    done = [run_dir / stage / "DONE" for stage in ("pretrain", "sft")]
    assert done[0].stat().st_mtime < done[1].stat().st_mtime
    assert [m["step"] for m in read_metrics(run_dir / "sft") if "loss" in m] == [1, 2, 3]


def test_usr1_checkpoints_requeues_and_resumes(cluster, corpus, tmp_path, torchrun_curve):
    job, = submit(*run_args(corpus, tmp_path))
    metrics = tmp_path / "pretrain/metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), log(tmp_path, "pretrain", job)
        assert time.monotonic() < deadline, "the job logged no step in time"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # to the job's tasks, as a preemption
    info = cluster.wait(job, timeout=300)
    text = log(tmp_path, "pretrain", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" in text
    assert "step exited with 0" in text and "requeueing job" in text  # the launcher left its marker
    resumed = int(text.split("[pretrain] resumed from step ")[1].split()[0])
    assert 2 <= resumed < STEPS, text  # the preemption checkpoint, mid-run (save_every is 100)
    checkpoints = sorted(p.name for p in (tmp_path / "pretrain/checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{resumed:08d}", f"step_{STEPS:08d}"]
    assert len(training_steps(tmp_path / "pretrain")) == STEPS
    assert_same_curves(tmp_path / "pretrain", torchrun_curve, 1e-6, 1e-6)
