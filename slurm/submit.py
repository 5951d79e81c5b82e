"""Recipe -> one sbatch script per stage -> a chain of jobs (each after the previous one succeeded).

    check(cfg)                                  ConfigError naming the key, before anything is submitted
    render(cfg, stage, recipe, overrides) -> the batch script of one stage (slurm/train.sbatch filled in)
    submit(recipe, overrides, stages, dry_run) -> job ids (python -m slurm is its command line)

A training stage's job has slurm.nodes x slurm.tasks_per_node ranks (slurm.stage_nodes gives a stage
its own node count, e.g. pretraining on 8 nodes and {sft: 1}); tasks_per_node defaults to
slurm.gpus_per_node (one rank per GPU), a CPU job (gloo) sets gpus_per_node=0 and tasks_per_node.
The layout (parallel.tp x parallel.ep, batch divisibility) must fit those ranks. tokenize and export
run on rank 0 alone in the trainer, so their jobs get one node and one rank (and one GPU on GPU
nodes: GPU partitions often refuse jobs without one). A multi-node recipe needs slurm.partition (a
cluster's default partition is rarely where its 8-GPU nodes are); a single-node one may use the default.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from trainer.config import TRAINING_STAGES, ConfigError, load_config, model_config_of

from . import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]  # this repository: on PYTHONPATH in the jobs
TEMPLATE = ROOT / "slurm" / "train.sbatch"
DEFAULT_ENV = {  # the recipe's slurm.env overrides any of them
    "OMP_NUM_THREADS": None,  # slurm.cpus_per_task: threads per rank (torchrun's default is 1)
    "PYTHONUNBUFFERED": "1",  # log lines reach the job's output file as they are printed
    "NCCL_DEBUG": "WARN",  # INFO shows the chosen network, rings and trees
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed rank aborts the collectives instead of hanging
}


def job_shape(cfg: DictConfig, stage: str) -> tuple[int, int, int]:
    """(nodes, ranks per node, GPUs per node) of a stage's job."""
    s = cfg.slurm
    if stage in TRAINING_STAGES:
        return s.stage_nodes.get(stage, s.nodes), s.tasks_per_node or s.gpus_per_node, s.gpus_per_node
    return 1, 1, min(s.gpus_per_node, 1)


def check(cfg: DictConfig) -> None:
    """Validate the slurm section, and the layout of every training stage against its job."""
    from parallel.layout import Layout, LayoutError

    s = cfg.slurm
    for key, least in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("signal_seconds", 1)):
        if s[key] < least:
            raise ConfigError(f"slurm.{key} must be >= {least}, got {s[key]}")
    if s.gpus_per_node == 0 and not s.tasks_per_node:
        raise ConfigError("slurm.gpus_per_node=0 (a CPU job) needs slurm.tasks_per_node, the ranks per node")
    if s.tasks_per_node is not None and s.tasks_per_node < 1:
        raise ConfigError(f"slurm.tasks_per_node must be >= 1, got {s.tasks_per_node}")
    if s.gpus_per_node and s.tasks_per_node and s.tasks_per_node > s.gpus_per_node:
        raise ConfigError(f"slurm.tasks_per_node ({s.tasks_per_node}) asks for more GPUs than "
                          f"slurm.gpus_per_node ({s.gpus_per_node}): every rank needs its own GPU")
    for stage, n in s.stage_nodes.items():
        if stage not in TRAINING_STAGES or n < 1:
            raise ConfigError(f"slurm.stage_nodes.{stage}={n}: expected a training stage "
                              f"({', '.join(TRAINING_STAGES)}) and at least one node")
    p, what = cfg.parallel, "GPUs" if s.gpus_per_node else "ranks"
    for stage in [stage for stage in cfg.stages if stage in TRAINING_STAGES]:
        nodes, tasks, _ = job_shape(cfg, stage)
        key = f"slurm.stage_nodes.{stage}" if stage in s.stage_nodes else "slurm.nodes"
        if nodes > 1 and not s.partition:
            raise ConfigError(f"slurm.partition is required for a multi-node job ({key}={nodes})")
        ranks = nodes * tasks
        job = f"{key} ({nodes}) x {tasks} per node = {ranks} {what}"
        if p.tp * p.ep > ranks:
            raise ConfigError(f"parallel.tp x parallel.ep = {p.tp} x {p.ep} = {p.tp * p.ep} {what}, more "
                              f"than the job has: {job}")
        try:
            Layout.plan(p, model_config_of(cfg), cfg[stage], ranks)
        except LayoutError as e:
            raise ConfigError(f"{stage} does not fit the job ({job}): {e}") from e


def render(cfg: DictConfig, stage: str, recipe: str, overrides: list[str]) -> str:
    """The batch script that runs `python -m trainer RECIPE --stage STAGE OVERRIDES` on the job's ranks."""
    s, run_dir = cfg.slurm, Path(cfg.run_dir).resolve()
    nodes, tasks, gpus = job_shape(cfg, stage)
    sbatch = [f"--job-name={run_dir.name}-{stage}", f"--nodes={nodes}", "--ntasks-per-node=1",
              f"--cpus-per-task={s.cpus_per_task * tasks}"]
    if gpus:
        sbatch.append(f"--gpus-per-node={gpus}")
    sbatch.append(f"--time={s.time}")
    sbatch += [f"--{key}={s[key]}" for key in ("partition", "account") if s[key]]
    sbatch += [f"--chdir={Path.cwd()}", f"--output={run_dir}/slurm/{stage}-%j.out", "--open-mode=append",
               "--requeue", f"--signal=B:USR1@{s.signal_seconds}", *s.extra_sbatch]
    env = {**DEFAULT_ENV, "OMP_NUM_THREADS": str(s.cpus_per_task), **s.env}
    fields = dict(
        sbatch="\n".join(f"#SBATCH {option}" for option in sbatch),
        root=shlex.quote(str(ROOT)),
        env="\n".join(f"export {key}={shlex.quote(str(value))}" for key, value in env.items()),
        stage=stage, nodes=nodes, tasks_per_node=tasks, launcher_cpus=s.cpus_per_task * tasks,
        python=shlex.quote(sys.executable), shutdown_timeout=s.signal_seconds, preempted=EXIT_PREEMPTED,
        marker_prefix=shlex.quote(str(run_dir / "slurm" / stage)),
        trainer_args=shlex.join([str(Path(recipe).resolve()), "--stage", stage, *overrides]))
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(fields[m.group(1)]), TEMPLATE.read_text())


def submit(recipe: str, overrides: list[str], stages: list[str] = None, dry_run: bool = False) -> list[str]:
    """Render and submit the recipe's stages (or `stages`), each after the previous one succeeded
    (--dependency=afterok). Prints the job ids, one per line (with --dry-run: the scripts). All
    checks run before the first sbatch."""
    if stages:
        overrides = [*overrides, f"stages=[{','.join(stages)}]"]
    cfg = load_config(recipe, overrides)
    check(cfg)
    folder = Path(cfg.run_dir).resolve() / "slurm"
    scripts = {stage: render(cfg, stage, recipe, overrides) for stage in cfg.stages}
    jobs = []
    for stage, script in scripts.items():
        path = folder / f"{stage}.sbatch"
        command = ["sbatch", "--parsable", *([f"--dependency=afterok:{jobs[-1]}"] if jobs else []), str(path)]
        if dry_run:
            after = "  # after the previous job succeeded" if jobs else ""
            print(f"# ---- {stage}: {shlex.join(command)}{after}\n{script}", flush=True)
            jobs.append(f"<{stage}>")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed ({proc.returncode}): {proc.stderr.strip()}")
        jobs.append(proc.stdout.strip().split(";")[0])
        print(jobs[-1], flush=True)
        print(f"[slurm] {stage}: job {jobs[-1]}, log {folder}/{stage}-{jobs[-1]}.out", file=sys.stderr,
              flush=True)
    return jobs

