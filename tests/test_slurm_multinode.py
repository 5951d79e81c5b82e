"""python -m slurm across two nodes: a real SLURM on this machine whose nodes are network namespaces
(slurm/localhost.py, nodes=2), so ranks meet only over the links between "nodes", through the
rendezvous host, addresses and interfaces slurm/launch.py picks, as on a cluster.

- 2 nodes x 1 rank trains like torchrun on one node (loss and grad norm per step), at DP2 and at EP2
  (experts on different nodes: the all-to-all crosses the link);
- USR1 mid-run: both nodes' ranks checkpoint, the job requeues and resumes to the same curve; then
  an SFT job that depends on it (afterok) runs on one node (slurm.stage_nodes.sft=1);
- a rank killed on one node fails the whole job within seconds, a rank stopped (a frozen node) within
  the collective timeout and seconds; neither is taken for a preemption (no requeue), and the job
  requeued by hand resumes from the last complete checkpoint to the same curve.

Skipped when SLURM cannot be installed or the machine gives no network namespaces (not root).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_curves, pretrain_args, read_metrics, run_cli, training_steps
from slurm.localhost import FINISHED, LocalSlurm, NoNamespaces, Unavailable, install

pytestmark = pytest.mark.slurm
STEPS = 8
TWO_NODES = ["slurm.nodes=2", "slurm.tasks_per_node=1", "slurm.gpus_per_node=0", "slurm.cpus_per_task=1",
             "slurm.partition=local", "slurm.time=00:15:00"]
LAYOUTS = {"dp2": [], "ep2": ["parallel.ep=2"]}
COLLECTIVE_TIMEOUT = 10  # s: parallel.collective_timeout_s of the lost-rank job
# measured on 2 busy cores: the job ends 2-6 s after a rank is killed, 16 s after one is stopped
LOST_RANK_FAILS_WITHIN = COLLECTIVE_TIMEOUT + 30  # s


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    try:
        install()
    except Unavailable as e:
        pytest.skip(f"no SLURM on localhost: {e}")
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm2"), cpus=2, nodes=2) as cluster:
            yield cluster
    except NoNamespaces as e:
        pytest.skip(f"no two-node SLURM on this machine: {e}")


def run_args(corpus, run_dir, layout, *extra):
    args = pretrain_args(corpus, run_dir, steps=STEPS, **{"logging.wandb": "disabled"})
    return [*args, *LAYOUTS[layout], *extra]


def submit(*args) -> list[str]:
    """`python -m slurm ...` for a 2-node x 1-rank CPU job; the job ids it printed."""
    proc = subprocess.run([sys.executable, "-m", "slurm", *map(str, args), *TWO_NODES], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env=dict(os.environ, WANDB_MODE="disabled"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def log(run_dir, stage, job) -> str:
    return (Path(run_dir) / "slurm" / f"{stage}-{job}.out").read_text()


def wait_for_step(cluster, job, run_dir, step: int) -> None:
    """Until the job's metrics show `step` (the job must stay pending or running meanwhile)."""
    metrics, deadline = Path(run_dir) / "pretrain/metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
        info = cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING"), log(run_dir, "pretrain", job)
        cluster.hurry(info)  # a requeued job
        assert time.monotonic() < deadline, f"the job logged no step {step} in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def torchrun_curves(corpus, tmp_path_factory):
    """One node, 2 ranks under torchrun: the reference curve of each layout."""
    curves = {}
    for layout in LAYOUTS:
        run_dir = tmp_path_factory.mktemp(f"torchrun-{layout}")
        run_cli(*run_args(corpus, run_dir, layout), nproc=2)
        curves[layout] = run_dir / "pretrain"
    return curves


def test_launcher_decides_store_host_interface_and_address_on_each_node(cluster):
    """Inside each node's namespace, what slurm.launch tells torchrun: which node hosts the store, the
    address rank 0 advertises, the interfaces gloo and NCCL bind to; a variable the user set is kept.
    The expected names and addresses are the ones the harness gave the nodes."""
    first, second = cluster.network.nodes
    code = ("import json, os; from torch.distributed.run import parse_args; from slurm.launch import prepare;"
            f"args = parse_args(['--nnodes=2', '--rdzv-backend=c10d', '--rdzv-endpoint={first.name}:29400', "
            "'x.py']); prepare(args); print(json.dumps([args.rdzv_conf, args.local_addr, "
            "os.environ.get('GLOO_SOCKET_IFNAME'), os.environ.get('NCCL_SOCKET_IFNAME')]))")
    job = {"PYTHONPATH": str(ROOT), "SLURM_JOB_NODELIST": f"{first.name},{second.name}"}
    seen = {}
    for node, given in [(first, {}), (second, {"GLOO_SOCKET_IFNAME": "lo"})]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_SOCKET_IFNAME")}
        proc = subprocess.run([*node.run, sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, env=dict(env, SLURMD_NODENAME=node.name, **job, **given))
        assert proc.returncode == 0, proc.stderr
        seen[node.name] = json.loads(proc.stdout.splitlines()[-1])
    assert seen[first.name] == ["is_host=1", first.address, first.interface, first.interface]
    assert seen[second.name] == ["is_host=0", second.address, "lo", second.interface]


def test_interface_and_peer_choice_in_this_namespace(cluster):
    from slurm.launch import interface_address, interface_towards, peer_of

    assert interface_towards("127.0.0.1") == "lo"
    assert interface_towards(cluster.network.nodes[1].address) == cluster.network.bridge  # via the bridge
    assert interface_address(cluster.network.bridge) == cluster.network.address
    assert interface_towards("no-such-host.invalid") is None
    nodes = {"SLURM_JOB_NODELIST": "gpu[07-09]"}
    assert [peer_of(node, "gpu07", nodes) for node in ("gpu07", "gpu08", "gpu09")] == ["gpu08", "gpu07",
                                                                                       "gpu07"]


@pytest.fixture(scope="module")
def preempted_chain(cluster, corpus, tmp_path_factory):
    """pretrain at DP2 over both nodes, sent USR1 after step 2, then SFT on one node after it (afterok): job ids
    and their final `scontrol show job` fields."""
    run_dir = tmp_path_factory.mktemp("preempted")
    sft = ["sft.data=data/instruct/chat.jsonl", "sft.steps=2", "sft.seq_len=128", "sft.micro_batch_size=2",
           "sft.global_batch_size=4", "sft.log_every=1", "sft.eval_batches=1", "slurm.stage_nodes.sft=1"]
    jobs = submit(*run_args(corpus, run_dir, "dp2"), *sft, "--stages", "pretrain,sft")
    wait_for_step(cluster, jobs[0], run_dir, 2)
    subprocess.run(["scancel", "--signal=USR1", jobs[0]], check=True)  # to the tasks on both nodes
    return run_dir, jobs, [cluster.wait(job, timeout=150) for job in jobs]


def test_usr1_checkpoints_on_both_nodes_and_resumes(preempted_chain, torchrun_curves):
    run_dir, (job, _), (info, _) = preempted_chain
    text = log(run_dir, "pretrain", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert info["NumNodes"] == "2", info
    first_run = text.split("SLURM_RESTART_COUNT=1")[0]
    assert first_run.count("got signal: 10; the workers were told to checkpoint") == 2, text  # both nodes
    assert "step exited with 0" in first_run and "requeueing job" in first_run  # not cut short by srun
    resumed = int(text.split("[pretrain] resumed from step ")[1].split()[0])
    assert 2 <= resumed < STEPS, text
    checkpoints = sorted(p.name for p in (run_dir / "pretrain/checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{resumed:08d}", f"step_{STEPS:08d}"]
    assert_same_curves(run_dir / "pretrain", torchrun_curves["dp2"], 1e-6, 1e-6)


def test_sft_runs_after_the_requeued_pretraining(preempted_chain):
    run_dir, (_, second), (pretrain, sft) = preempted_chain
    assert sft["JobState"] == "COMPLETED" and sft["NumNodes"] == "1", log(run_dir, "sft", second)
    assert sft["StartTime"] >= pretrain["EndTime"], (pretrain, sft)  # ISO times sort as strings
    assert [m["step"] for m in read_metrics(run_dir / "sft") if "loss" in m] == [1, 2]


def trainer_pids(node) -> list[int]:
    """The trainer ranks (torchrun's workers, not the launcher) running in `node`'s namespace."""
    pids = subprocess.run(["ip", "netns", "pids", node.name], capture_output=True, text=True).stdout.split()
    ranks = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer" in argv and b"slurm.launch" not in argv:
            ranks.append(int(pid))
    return ranks


def lose_rank(cluster, job, run_dir, at_step: int, sig: int) -> float:
    """Send `sig` to node 2's rank once the job has logged `at_step`; wait until the job has ended.
    Returns the seconds from the signal to the job's end."""
    wait_for_step(cluster, job, run_dir, at_step)
    pid, = trainer_pids(cluster.network.nodes[1])
    sent = time.monotonic()
    os.kill(pid, sig)
    while cluster.job(job)["JobState"] not in FINISHED:
        assert time.monotonic() - sent < LOST_RANK_FAILS_WITHIN, log(run_dir, "pretrain", job)
        time.sleep(0.2)
    return time.monotonic() - sent


def test_lost_or_hung_rank_fails_the_job_and_the_requeued_job_resumes(cluster, corpus, tmp_path,
                                                                       torchrun_curves):
    """EP2 (experts split over the nodes), a checkpoint every 3 steps. Node 2's rank is killed after
    step 4: its peer sees the closed connection at once. Requeued, the job resumes from step 3; node 2's
    rank is stopped (a frozen node: no connection closes) after step 7: its peer's collective times
    out (parallel.collective_timeout_s). Each time the whole job must fail within
    LOST_RANK_FAILS_WITHIN without requeueing itself (not a preemption), and `scontrol requeue` must
    resume it from the last complete checkpoint; every step logged matches the reference curve."""
    job, = submit(*run_args(corpus, tmp_path, "ep2", "pretrain.save_every=3",
                            f"parallel.collective_timeout_s={COLLECTIVE_TIMEOUT}"))
    checkpoints = tmp_path / "pretrain/checkpoints"
    for restarts, (at_step, sig, resumes_at) in enumerate([(4, signal.SIGKILL, 3), (7, signal.SIGSTOP, 6)]):
        seconds = lose_rank(cluster, job, tmp_path, at_step, sig)
        print(f"[{sig.name} on node 2's rank] the job failed {seconds:.1f} s later")
        info, text = cluster.job(job), log(tmp_path, "pretrain", job)
        assert info["JobState"] == "FAILED" and info["Restarts"] == str(restarts), text
        assert "requeueing" not in text, text
        assert not any(trainer_pids(node) for node in cluster.network.nodes), "a rank outlived its job"
        assert (checkpoints / "latest").read_text().strip() == f"step_{resumes_at:08d}"
        subprocess.run(["scontrol", "requeue", job], check=True)
    info = cluster.wait(job, timeout=150)
    text = log(tmp_path, "pretrain", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", text
    assert [int(part.split()[0]) for part in text.split("[pretrain] resumed from step ")[1:]] == [3, 6]
    first, last = {}, {}  # the steps after each checkpoint come twice: from the lost run and the next
    for m in training_steps(tmp_path / "pretrain"):
        first.setdefault(m["step"], m)
        last[m["step"]] = m
    for name, rows in (("first", first), ("last", last)):
        curve = tmp_path / f"curve-{name}"
        curve.mkdir()
        (curve / "metrics.jsonl").write_text("".join(json.dumps(rows[s]) + "\n" for s in sorted(rows)))
        assert_same_curves(curve, torchrun_curves["ep2"], 1e-6, 1e-6)
