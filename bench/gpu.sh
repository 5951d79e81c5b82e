#!/usr/bin/env bash
# One H100/H200, under 8 minutes: install, measure, print one table (bench/gpu_table.py) and the goals.
#   bash bench/gpu.sh              # CUDA, bf16
#   bash bench/gpu.sh --cpu-smoke  # the same steps at tiny shapes on the CPU in fp32: a check of the script
# Measures (bench/RESULTS.md, "GPU: bench/gpu.sh"):
#   - the Mixtral-shaped stack (train_throughput.py --case mixtral-gpu) through the trainer
#     (deepspeed+fused) with flash-attn and with SDPA, and transformers' MixtralForCausalLM, in one run;
#     each trainer run's measured peak memory next to trainer.plan's for its settings;
#   - one MoE layer at the Mixtral shape at G = 1, 2, 4, 8 (moe_layer.py): ours, DeepSpeed's, transformers'.
# Goals: trainer MFU >= 47 % of 989 TFLOP/s dense bf16; >= 2x transformers' tokens/s; planner within 20 %.
# Every step runs under `timeout`; a step that fails or hangs leaves "not run" or its error in the table
# and makes the exit status 1 (missed goals do not: they are printed). Logs and JSON: $GPU_BENCH_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_BENCH_DIR:-runs/gpu_bench}
mkdir -p "$out" && rm -f "$out"/*.json
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
failed=0

step() {  # LIMIT_S NAME COMMAND...: COMMAND under a time limit, its output in $out/NAME.log
    local limit=$1 name=$2 start=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc$([[ $rc == 124 ]] && echo ' (timed out)') after $((SECONDS - start)) s of $limit s," \
        "log $out/$name.log"
    return $rc
}

if [[ ${1:-} == --cpu-smoke ]]; then
    device=cpu
    stack=(--preset debug --batch 2 --seq 64 --dtype fp32 --warmup 1 --steps 2)
    moe=(--dim 64 --expert-dim 128 --tokens 256 --dtype fp32 --steps 2 --warmup 1)
else
    device=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=1
    stack=(--case mixtral-gpu --warmup 2 --steps 4)  # 2 Mixtral-8x7B layers, bf16, 8 x 4096
    moe=(--dim 4096 --expert-dim 14336 --experts 8 --top-k 2 --tokens 8192 --dtype bf16 --steps 3 --warmup 1)
fi

# 90 s: enough to check a machine that has the pinned packages; a bare one needs the pip line run first
step 90 install python -m pip install -q --disable-pip-version-check -r requirements.txt || failed=1
if [[ $device == cuda ]]; then  # a wheel only (FLASH_ATTN_WHEEL: a wheel's path or URL); building takes hours
    step 40 flash-attn python -m pip install -q --only-binary=:all: "${FLASH_ATTN_WHEEL:-flash-attn}"
fi
ours=deepspeed+fused+sdpa
if python -c "from flash_attn import flash_attn_varlen_func" 2>/dev/null; then
    ours=deepspeed+fused+flash,$ours
fi

step 230 stack python bench/train_throughput.py "${stack[@]}" --device $device --rounds 1 --ours $ours \
    --json "$out/stack.json" || failed=1
step 95 moe python bench/moe_layer.py "${moe[@]}" --device $device \
    --variants ours,deepspeed-moe,hf-grouped_mm,hf-eager --json "$out/moe.json" || failed=1

echo
python bench/gpu_table.py "$out/stack.json" "$out/moe.json" | tee "$out/table.md" || failed=1
exit $failed
