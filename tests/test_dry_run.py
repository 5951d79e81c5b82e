"""`python -m trainer RECIPE --dry-run`: rank 0 of the shipped full-size recipes (Mixtral 8x7B on 64
ranks, 8x22B on 128) built in one CPU process. Its local parameter count equals the closed form of
its layout from the published shapes, and the process stays under 2 GiB (peak RSS measured by a
parent process that waits for it alone: RUSAGE_CHILDREN)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli

MEASURE = ("import resource, subprocess, sys; "
           "r = subprocess.run([sys.executable, '-m', 'trainer', *sys.argv[1:]]); "
           "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def dry_run(*args):
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args, "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = int(re.search(r"local parameters: (\d+)", proc.stdout).group(1))
    return proc.stdout, local, int(re.search(r"maxrss_kib (\d+)", proc.stdout).group(1)) * 1024


def local_count(V, D, L, H, KV, Dh, E, F, tp, ep):
    """One rank's parameters: vocabulary and attention split over tp, norms and router whole, the
    experts split over ep (config.json of mistralai/Mixtral-8x7B-v0.1 and -8x22B-v0.1 give the shapes)."""
    attention = 2 * D * H * Dh + 2 * D * KV * Dh
    per_layer = attention // tp + 2 * D + E * D + 3 * D * F * E // ep
    return 2 * V * D // tp + L * per_layer + D


@pytest.mark.parametrize("recipe, ranks, expected", [
    ("mixtral-8x7b-pretrain", 64, local_count(32000, 4096, 32, 32, 8, 128, 8, 14336, tp=1, ep=8)),
    ("mixtral-8x22b-pretrain", 128, local_count(32768, 6144, 56, 48, 8, 128, 8, 16384, tp=2, ep=8)),
])
def test_full_size_rank_zero_on_one_cpu(recipe, ranks, expected):
    out, local, peak = dry_run(f"recipes/{recipe}.yaml")
    assert f"rank 0 of {ranks}" in out and "#SBATCH --nodes=" in out
    assert local == expected
    assert peak < 2 * 2 ** 30, f"peak RSS {peak / 2 ** 30:.2f} GiB"
    for key in ("weights", "gradients", "optimizer"):
        assert re.search(rf"{key}\s+planner\s+[\d.]+ GiB\s+counted\s+[\d.]+ GiB", out), key


def test_bad_layouts_are_one_error_line():
    proc = run_cli("recipes/mixtral-8x7b-pretrain.yaml", "--dry-run", "--world-size", "60", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "data-parallel size (60" in proc.stderr and "parallel.ep (8)" in proc.stderr
    proc = run_cli("recipes/mixtral-8x22b-pretrain.yaml", "--dry-run", "slurm.nodes=1", check=False)
    assert proc.returncode == 2 and "parallel.tp x parallel.ep = 2 x 8 = 16 GPUs" in proc.stderr
