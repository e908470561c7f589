#!/usr/bin/env bash
# The whole journey on the embedded SmolLM2-135M-Instruct, on a CPU, in a few minutes: pick a recipe, split the
# data, fine-tune with LoRA, turn the checkpoint into a PEFT adapter, merge it, chat with the result and measure
# it against the base model. Everything lands in ./quickstart (QUICKSTART_DIR to change it); STEPS (default 30)
# sets how many optimizer steps to train (about 10 s each on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QUICKSTART_DIR:-quickstart}
STEPS=${STEPS:-20}
CFG=smollm2_135m_instruct_lora_oasst1_e1
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "recipes for the embedded model"
tunesmith list-cfg -p smollm2_135m_instruct_lora

step "copy the LoRA / oasst1 recipe to edit it"
tunesmith copy-cfg "$CFG" "$OUT"

step "split the bundled OpenAssistant-Guanaco sample (518 conversations) 90 / 10"
tunesmith data split examples/data/oasst1_guanaco_eval.jsonl \
    --train "$OUT/oasst1-train.jsonl" --test "$OUT/oasst1-test.jsonl" --ratio 0.9 --seed 0

step "fine-tune: LoRA, $STEPS steps of 2 x 512 packed tokens (CPU-sized: no gradient checkpointing)"
tunesmith train "$OUT/${CFG}_copy.yaml" --work-dir "$OUT/work" \
    --set data.path="$OUT/oasst1-train.jsonl" training.max_steps="$STEPS" training.accumulative_counts=2 \
          training.gradient_checkpointing=false training.log_interval=5 evaluation.every_n_steps="$STEPS"

step "checkpoint -> PEFT adapter -> merged model"
tunesmith convert pth_to_hf "$OUT/${CFG}_copy.yaml" "$(cat "$OUT/work/last_checkpoint")" "$OUT/hf"
tunesmith convert merge builtin:smollm2-135m-instruct "$OUT/hf" "$OUT/merged" --max-shard-size 2GB

step "chat with the merged model (two questions, then EXIT)"
printf 'What is the capital of France?\n\nGive me one tip for sleeping well.\n\nEXIT\n' \
    | tunesmith chat "$OUT/merged" --max-new-tokens 60 --temperature 0

step "held-out loss and perplexity: fine-tuned vs base"
tunesmith eval "$OUT/merged" --data "$OUT/oasst1-test.jsonl" --compare builtin:smollm2-135m-instruct \
    --max-samples 16 --max-length 512 --max-new-tokens 24 --out "$OUT/eval"

step "done"
echo "loss curve: $OUT/work/loss.png   adapter: $OUT/hf   merged: $OUT/merged   report: $OUT/eval/report.md"
