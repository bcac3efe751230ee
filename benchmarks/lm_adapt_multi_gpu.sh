#!/usr/bin/env bash
# The lm-adapt recipe on one GPU, then on two through `accelerate launch` (issue 7): the same
# command, per-process batch and steps; prints and writes step time and tokens/s of both.
#   bash benchmarks/lm_adapt_multi_gpu.sh MODEL_DIR DATA_DIR OUT.json [STEPS]
# MODEL_DIR: a model `modadapt train lm-adapt --model` takes (e.g. runs/pretrained written by
# `benchmarks/lm_quality.py --save-pretrained`); DATA_DIR holds train.txt.gz and valid.txt.gz.
set -euo pipefail
model=$1 data=$2 out=$3 steps=${4:-300}
work=$(mktemp -d)
args=(train lm-adapt --data "$data/train.txt.gz" --valid-data "$data/valid.txt.gz" --model "$model"
      --router topk --capacity 0.125 --layers every-other --max-steps "$steps" --batch-size 32 --seq-len 512
      --mixed-precision bf16 --max-eval-blocks 64 --no-progress)
CUDA_VISIBLE_DEVICES=0 python3 -m modadapt.cli "${args[@]}" -o "$work/one"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    -m modadapt.cli "${args[@]}" -o "$work/two"
python3 - "$work" "$out" <<'PY'
import json, sys, torch
work, out = sys.argv[1:]
keys = ("processes", "step_time_s", "tokens_per_s", "train_time_s", "steps", "flops_ratio", "valid_ppl")
runs = [{k: json.load(open(f"{work}/{name}/summary.json"))[k] for k in keys} for name in ("one", "two")]
result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": runs,
          "tokens_per_s_scaling": runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]}
json.dump(result, open(out, "w"), indent=2)
for r in runs:
    print(f"{r['processes']} GPU(s): {1000 * r['step_time_s']:.1f} ms per step, {r['tokens_per_s']:,.0f} tokens/s")
print(f"tokens/s on 2 GPUs / 1 GPU: {result['tokens_per_s_scaling']:.2f}")
PY
