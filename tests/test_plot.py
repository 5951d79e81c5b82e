"""trainer/plot.py on a synthetic run: the three PNGs, stage folders, and errors that name file and line."""

import json

import matplotlib.image
import pytest

from trainer.plot import main, plot_run

LOAD = [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]  # 2 layers x 4 experts


def write_run(folder, n=30, expert_load=True):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, n + 1):
        record = {"stage": "pretrain", "step": step, "loss": 10 - step / 10, "aux_loss": 0.02,
                  "lr": 1e-3, "grad_norm": 1.0, "step_time": 0.5, "tokens_per_s": 4096.0,
                  "tflops": 0.1, "memory_gb": 1.5}
        if expert_load:
            record |= {"expert_load": LOAD, "router_entropy": [1.2, 1.38]}
        lines.append(json.dumps(record))
        if step % 10 == 0:
            lines.append(json.dumps({"stage": "pretrain", "step": step, "eval_loss": 10 - step / 9}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_writes_three_pngs(tmp_path):
    run = write_run(tmp_path / "pretrain")
    written = plot_run(run)
    assert sorted(p.name for p in written) == ["expert_load.png", "loss.png", "throughput.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] >= 300 and image.shape[1] >= 700  # a real figure, not an empty canvas
        assert image[..., :3].std() > 0.05  # something is drawn


def test_run_folder_with_stages_and_no_expert_load(tmp_path):
    write_run(tmp_path / "run" / "pretrain")
    write_run(tmp_path / "run" / "sft", n=5, expert_load=False)
    assert main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run/pretrain/expert_load.png").is_file()
    assert (tmp_path / "run/sft/loss.png").is_file() and (tmp_path / "run/sft/throughput.png").is_file()
    assert not (tmp_path / "run/sft/expert_load.png").exists()


def test_errors_name_the_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "bad", n=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not a JSON object"):
        plot_run(run)
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
