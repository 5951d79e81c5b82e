"""lm-evaluation-harness (EleutherAI's `lm-eval`, pinned in requirements.txt and imported only when tasks
are asked for) on a Hugging Face Mixtral folder, with transformers as its backend ("hf" model).

Tasks are lm-eval task names: the harness' own (they download their data from the Hub) or those of
YAML files in `include_path`, such as data/eval/lm_eval/ (local data, runs offline). The result per
task is lm-eval's metrics, e.g. {"acc,none": 0.5, "acc_stderr,none": 0.1}.
"""


class LMEvalMissing(RuntimeError):
    pass


def run_lm_eval(hf_dir, tasks: list[str], include_path=None, limit: int = 0, batch_size: int = 8,
                device: str = "cpu") -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LMEvalMissing("evaluate.lm_eval_tasks needs lm-evaluation-harness: pip install lm-eval==0.4.13") \
            from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, tasks=list(tasks),
        task_manager=manager, limit=limit or None, batch_size=batch_size, device=device)
    return {task: {metric: value for metric, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in results["results"].items()}
