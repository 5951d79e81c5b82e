"""The one table of bench/gpu.sh, from the --json files of bench/train_throughput.py and bench/moe_layer.py.

    python bench/gpu_table.py STACK.json MOE.json

Goals checked (lines after the table):
- the trainer (deepspeed+fused) reaches MFU >= 47 % of the 989 TFLOP/s dense bf16 datasheet peak
  (where the run has no datasheet peak, the CPU smoke: of the matmul peak measured in the run);
- it trains >= 2x the tokens/s of transformers' MixtralForCausalLM;
- trainer.plan's peak is within 20 % of the measured peak (the planner's stated accuracy).
Each is checked for every attention backend that ran. A missing file or variant is a row that says so.
"""

import json
import sys
from pathlib import Path

MFU_GOAL, SPEEDUP_GOAL, PLAN_TOLERANCE = 0.47, 2.0, 0.2
BACKENDS = {"flash": "flash-attn", "sdpa": "SDPA"}
GIB = 2 ** 30


def load(path: str) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def last_line(text: str) -> str:
    """The last non-empty line of a failure message, cut for a table cell."""
    return ([ln for ln in text.splitlines() if ln.strip()] or [""])[-1].replace("|", "/")[:100]


def stack_rows(stack: dict, goals: list) -> list:
    """Rows of the Mixtral-shaped stack; appends (goal, met) pairs to goals."""
    if not stack:
        return [["stack", "not run (bench/train_throughput.py wrote no results)", "", "", "", ""]]
    results, failed = stack["results"], stack["failed"]
    peak = stack["peak_flops_datasheet"] or stack["peak_flops_measured"]
    basis = f"{peak / 1e12:.4g} TFLOP/s ({'datasheet' if stack['peak_flops_datasheet'] else 'measured'})"

    def mfu(r):
        return r["tokens_per_s"] * stack["flops_per_token"] / peak

    def check(goal: str, ok: bool) -> str:
        goals.append((goal, ok))
        return "yes" if ok else "no"

    hf = results.get("transformers")
    rows = [[f"stack: {stack['shape']}, {stack['batch']} x {stack['seq']}, {stack['dtype']}, "
             f"{stack['device']}", "", "", "", "", ""]]
    rows.append(["transformers MixtralForCausalLM: tokens/s, MFU, peak GiB", "", "",
                 f"{hf['tokens_per_s']:,.0f}, {mfu(hf):.1%}, {hf['peak_bytes'] / GIB:.2f}" if hf else
                 last_line(failed.get("transformers", "not run")), "", ""])
    for backend, name in BACKENDS.items():
        r = results.get(f"deepspeed+fused+{backend}")
        if r is None:
            why = failed.get(f"deepspeed+fused+{backend}",
                             "not run (flash-attn not importable)" if backend == "flash" else "not run")
            rows.append([f"trainer, {name}", last_line(why), "", "", "", ""])
            continue
        speedup = r["tokens_per_s"] / hf["tokens_per_s"] if hf else 0
        ratio = r["planned_peak_bytes"] / r["peak_bytes"]
        rows += [
            [f"trainer, {name}: MFU of {basis}", f"{mfu(r):.1%}", "", f"{mfu(hf):.1%}" if hf else "",
             f">= {MFU_GOAL:.0%}", check(f"trainer MFU with {name} >= {MFU_GOAL:.0%} of {basis}",
                                          mfu(r) >= MFU_GOAL)],
            [f"trainer, {name}: tokens/s", f"{r['tokens_per_s']:,.0f} ({speedup:.2f}x)", "",
             f"{hf['tokens_per_s']:,.0f}" if hf else "", f">= {SPEEDUP_GOAL:g}x transformers",
             check(f"trainer tokens/s with {name} >= {SPEEDUP_GOAL:g}x transformers'",
                   speedup >= SPEEDUP_GOAL)],
            [f"trainer, {name}: peak GiB measured / planner",
             f"{r['peak_bytes'] / GIB:.2f} / {r['planned_peak_bytes'] / GIB:.2f} ({ratio:.2f}x)", "",
             f"{hf['peak_bytes'] / GIB:.2f}" if hf else "", f"planner within {PLAN_TOLERANCE:.0%}",
             check(f"planner peak with {name} within {PLAN_TOLERANCE:.0%} of measured",
                   abs(ratio - 1) <= PLAN_TOLERANCE)]]
    return rows


def moe_rows(moe: dict) -> list:
    """tokens/s of one MoE layer forward + backward at each granularity."""
    if not moe:
        return [["MoE layer", "not run (bench/moe_layer.py wrote no results)", "", "", "", ""]]
    rows = [[f"MoE layer: {moe['tokens']} tokens, dim {moe['dim']}, {moe['dtype']}, {moe['device']}; "
             "forward + backward tokens/s", "", "", "", "", ""]]
    by_g = {}
    for r in moe["rows"]:
        shape = r["G"], r["experts"], r["expert_dim"], r["top_k"]
        by_g.setdefault(shape, {})[r["variant"]] = r["tokens_per_s"]
    for (G, E, F, k), t in by_g.items():
        ours = t.get("ours", 0)
        fmt = {v: f"{s:,.0f} ({ours / s:.2f}x)" if ours else f"{s:,.0f}" for v, s in t.items()}
        hf = " / ".join(fmt[v] for v in ("hf-grouped_mm", "hf-eager") if v in t)
        rows.append([f"MoE layer G={G}: {E} x {F}, top-{k}", f"{ours:,.0f}" if ours else "",
                     fmt.get("deepspeed-moe", ""), hf, "", ""])
    return rows


def main():
    stack_path, moe_path = sys.argv[1:]
    goals = []
    rows = stack_rows(load(stack_path), goals) + moe_rows(load(moe_path))
    head = ["measure", "trainer / ours", "DeepSpeed MoE (ours / it)",
            "transformers (grouped_mm / eager; ours / it)", "goal", "met"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    print()
    for goal, ok in goals:
        print(f"goal {'MET   ' if ok else 'MISSED'} {goal}")
    print(f"{sum(ok for _, ok in goals)} of {len(goals)} goals met")


if __name__ == "__main__":
    main()
