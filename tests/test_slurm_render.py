"""python -m slurm without a cluster: the rendered batch scripts and the checks before submission.

A stand-in `sbatch` on PATH records its calls (and answers job ids), so each test sees exactly what
would have been submitted; the real submission is tests/test_slurm_localhost.py.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from slurm import EXIT_PREEMPTED
from slurm.__main__ import main

MIXTRAL = str(ROOT / "recipes/mixtral-8x7b-pretrain.yaml")
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
CPU_JOB = ["slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1",
           "pretrain.micro_batch_size=4"]  # the quickstart's 8 sequences a step over 2 ranks


@pytest.fixture
def sbatch(tmp_path, monkeypatch):
    """A fake sbatch first on PATH: appends its arguments to `calls`, prints job ids 101, 102, ..."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho $((100 + $(wc -l < {calls})))\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return calls


def scripts(stdout: str) -> dict:
    """--dry-run output -> {stage: (sbatch command line, script)}."""
    parts = re.split(r"^# ---- (\w+): (.*)$", stdout, flags=re.M)[1:]
    return {stage: (command, script) for stage, command, script in zip(parts[::3], parts[1::3], parts[2::3])}


def test_mixtral_8x7b_dry_run(sbatch, tmp_path, capsys):
    assert main([MIXTRAL, "--dry-run"]) == 0
    jobs = scripts(capsys.readouterr().out)
    assert list(jobs) == ["pretrain", "export"]
    assert not sbatch.exists() and not (tmp_path / "runs").exists()  # nothing submitted or written
    run_dir = tmp_path / "runs/mixtral-8x7b"
    assert jobs["export"][0].endswith(f"--dependency=afterok:<pretrain>' {run_dir}/slurm/export.sbatch"
                                      "  # after the previous job succeeded")
    # pretrain: 8 nodes x 8 GPUs, one launcher task per node owning 8 GPUs and 8 x 12 cores; export
    # runs on rank 0 alone: one node, one rank
    shapes = {"pretrain": (8, 8, 8), "export": (1, 1, 1)}
    for stage, (_, script) in jobs.items():
        nodes, ranks, gpus = shapes[stage]
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
        header = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
        for option in [f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus}",
                       f"--cpus-per-task={12 * ranks}", "--time=48:00:00", "--partition=gpu",
                       f"--chdir={tmp_path}", f"--output={run_dir}/slurm/{stage}-%j.out",
                       "--open-mode=append", "--requeue", "--signal=B:USR1@300", "--exclusive", "--mem=0"]:
            assert option in header, (option, header)
        assert not any(o.startswith("--account") for o in header)
        # the rendezvous endpoint: the first host of the allocation
        assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
        launch = " ".join(script[script.index("\nsrun "):script.index("&\n")].split("\\\n"))
        assert launch.split() == [
            "srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={12 * ranks}",
            "--kill-on-bad-exit=1", sys.executable, "-m", "slurm.launch", f"--nnodes={nodes}",
            f"--nproc-per-node={ranks}",
            "--rdzv-backend=c10d", '--rdzv-endpoint="$head_node:$rdzv_port"', '--rdzv-id="$SLURM_JOB_ID"',
            "--max-restarts=0", "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout=300", "-m", "trainer", MIXTRAL, "--stage", stage]
        for line in ["export OMP_NUM_THREADS=12", "export NCCL_DEBUG=WARN", "export PYTHONUNBUFFERED=1",
                     "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                     f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]:
            assert line in script.splitlines(), line
        assert 'SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}' in script
        assert "trap 'forward USR1' USR1" in script and "trap 'forward TERM' TERM" in script
        assert f"rc == {EXIT_PREEMPTED}" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_exit_code_is_the_trainers():
    from trainer.loop import EXIT_PREEMPTED as trainer_code
    assert EXIT_PREEMPTED == trainer_code


def test_cpu_job_and_env_overrides(sbatch, capsys):
    assert main([QUICKSTART, "--dry-run", "--stages", "pretrain", *CPU_JOB, "slurm.env.OMP_NUM_THREADS=3",
                 "slurm.env.GLOO_SOCKET_IFNAME=lo", "slurm.account=proj", "pretrain.lr=1e-3"]) == 0
    (command, script), = scripts(capsys.readouterr().out).values()
    lines = script.splitlines()
    assert "#SBATCH --cpus-per-task=2" in lines and "#SBATCH --nodes=1" in lines
    assert "#SBATCH --account=proj" in lines and not any("--partition" in line for line in lines)
    assert not any("--gpus" in line for line in lines)
    assert "--nnodes=1 --nproc-per-node=2" in script
    assert [line for line in lines if "export OMP_NUM_THREADS" in line] == ["export OMP_NUM_THREADS=3"]
    assert "export GLOO_SOCKET_IFNAME=lo" in lines
    # the job runs the trainer with the same overrides (and the stages asked for)
    assert script.split("-m trainer ")[1].split(" &")[0].split() == [
        QUICKSTART, "--stage", "pretrain", *CPU_JOB, "slurm.env.OMP_NUM_THREADS=3",
        "slurm.env.GLOO_SOCKET_IFNAME=lo", "slurm.account=proj", "pretrain.lr=1e-3", "'stages=[pretrain]'"]


def test_stages_are_submitted_as_a_chain(sbatch, tmp_path, capsys):
    # without the quickstart's evaluate stage, whose shipped corpora are paths relative to the repository
    assert main([QUICKSTART, f"run_dir={tmp_path}/run", *CPU_JOB, "stages=[tokenize,pretrain,export]"]) == 0
    assert capsys.readouterr().out.split() == ["101", "102", "103"]  # tokenize, pretrain, export
    folder = tmp_path / "run/slurm"
    assert sbatch.read_text().splitlines() == [
        f"--parsable {folder}/tokenize.sbatch",
        f"--parsable --dependency=afterok:101 {folder}/pretrain.sbatch",
        f"--parsable --dependency=afterok:102 {folder}/export.sbatch"]
    for stage, ranks in [("tokenize", 1), ("pretrain", 2), ("export", 1)]:
        script = (folder / f"{stage}.sbatch").read_text()
        assert f" -m trainer {QUICKSTART} --stage {stage} " in script
        assert f"--nnodes=1 --nproc-per-node={ranks} " in script


def test_a_stage_gets_its_own_node_count(sbatch, tmp_path, capsys):
    """slurm.stage_nodes: pretraining on 2 nodes, SFT after it on 1."""
    assert main([QUICKSTART, f"run_dir={tmp_path}/run", *CPU_JOB, "slurm.nodes=2", "slurm.partition=cpu",
                 "slurm.stage_nodes.sft=1", "pretrain.micro_batch_size=2", "sft.data=x.jsonl",
                 "sft.micro_batch_size=2", "sft.global_batch_size=4", "--stages", "pretrain,sft"]) == 0
    for stage, nodes in [("pretrain", 2), ("sft", 1)]:
        script = (tmp_path / f"run/slurm/{stage}.sbatch").read_text()
        assert f"#SBATCH --nodes={nodes}" in script.splitlines()
        assert f"--nnodes={nodes} --nproc-per-node=2 " in script


@pytest.mark.parametrize("args, message", [
    (["slurm.nodes=1", "parallel.tp=2"],
     "parallel.tp x parallel.ep = 2 x 8 = 16 GPUs, more than the job has: "
     "slurm.nodes (1) x 8 per node = 8 GPUs"),
    (["parallel.ep=3"],
     "pretrain does not fit the job (slurm.nodes (8) x 8 per node = 64 GPUs): data-parallel size "
     "(64 = world size 64 / parallel.tp 1) is not divisible by parallel.ep (3)"),
    (["pretrain.global_batch_size=96"],
     "global_batch_size (96) is not divisible by micro_batch_size (1) x dp (64)"),
    (["slurm.tasks_per_node=16"],
     "slurm.tasks_per_node (16) asks for more GPUs than slurm.gpus_per_node (8)"),
    (["slurm.partition=null"], "slurm.partition is required for a multi-node job (slurm.nodes=8)"),
    (["slurm.partition="], "slurm.partition is required for a multi-node job (slurm.nodes=8)"),
    (["slurm.gpus_per_node=0"], "slurm.gpus_per_node=0 (a CPU job) needs slurm.tasks_per_node"),
    (["--stages", "pretrain,finetune"], "unknown stage 'finetune'"),
    (["slurm.nodez=2"], "unknown config key 'slurm.nodez'"),
    (["slurm.stage_nodes.export=2"], "slurm.stage_nodes.export=2: expected a training stage"),
    (["slurm.stage_nodes.pretrain=0"], "slurm.stage_nodes.pretrain=0: expected a training stage"),
    (["slurm.stage_nodes.pretrain=1", "parallel.ep=16"],
     "parallel.tp x parallel.ep = 1 x 16 = 16 GPUs, more than the job has: "
     "slurm.stage_nodes.pretrain (1) x 8 per node = 8 GPUs"),
])
def test_bad_input_fails_before_submission(args, message, sbatch, capsys):
    assert main([MIXTRAL, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not sbatch.exists()
