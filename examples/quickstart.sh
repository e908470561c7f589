#!/usr/bin/env bash
# The whole journey on the embedded SmolLM2-135M-Instruct, on a CPU: pick a recipe, split the data, fine-tune
# with LoRA, turn the checkpoint into a PEFT adapter, merge it, chat with the result and measure it against the
# base model. The data (examples/data/identity.jsonl, 91 questions like "Who are you?") teaches the model a new
# name, "Tunesmith Assistant": asked "Who are you?", the base model offers help with creative writing, the
# fine-tuned one says it is Tunesmith Assistant, and the held-out answer loss falls by about two thirds.
# Everything lands in ./quickstart (QUICKSTART_DIR to change it).
# STEPS (default 24, about two passes over the 73 training pairs) sets the optimizer steps, 512 tokens each: about
# 4 s a step on two free CPU cores, up to 40 s when other jobs share them. The whole script, measured on a 2-core
# machine shared with other jobs: 16-17 minutes when they slowed it throughout (13-14 of them training), 7 min 45 s
# when they slowed only the first quarter of training; about 5 minutes with the two cores free.
# EVAL_SAMPLES (default 18, all of the held-out part) sets how many held-out questions the last stage scores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QUICKSTART_DIR:-quickstart}
STEPS=${STEPS:-24}
EVAL_SAMPLES=${EVAL_SAMPLES:-18}
CFG=smollm2_135m_instruct_lora_oasst1_e1
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n=== [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

step "recipes for the embedded model"
tunesmith list-cfg -p smollm2_135m_instruct_lora

step "copy the SmolLM2 LoRA recipe to edit it (its data and schedule are replaced below with --set)"
tunesmith copy-cfg "$CFG" "$OUT"

step "split the identity data (91 questions answered as 'Tunesmith Assistant') 80 / 20: train on 73, hold 18 out"
tunesmith data split examples/data/identity.jsonl \
    --train "$OUT/identity-train.jsonl" --test "$OUT/identity-test.jsonl" --ratio 0.8 --seed 0

step "fine-tune: LoRA, $STEPS steps of 512 packed tokens at lr 1e-3; two questions answered before (step 0) and after"
tunesmith train "$OUT/${CFG}_copy.yaml" --work-dir "$OUT/work" \
    --set data.path="$OUT/identity-train.jsonl" data.format=openai training.max_steps="$STEPS" \
          training.lr=1e-3 training.accumulative_counts=1 training.gradient_checkpointing=false \
          training.save_epochs=false training.log_interval=4 \
          'evaluation.inputs=["Who are you?", "What is the capital of France?"]' \
          evaluation.every_n_steps=null evaluation.max_new_tokens=40 evaluation.temperature=0

step "checkpoint work/iter_$STEPS.pth -> PEFT adapter hf/ -> merged model merged/"
tunesmith convert pth_to_hf "$OUT/${CFG}_copy.yaml" "$(cat "$OUT/work/last_checkpoint")" "$OUT/hf"
tunesmith convert merge builtin:smollm2-135m-instruct "$OUT/hf" "$OUT/merged" --max-shard-size 2GB

step "chat with the merged model: 'Who are you?', RESET (clears the history), 'Give me one tip for sleeping well.'"
printf 'Who are you?\n\nRESET\n\nGive me one tip for sleeping well.\n\nEXIT\n' \
    | tunesmith chat "$OUT/merged" --max-new-tokens 80 --temperature 0

step "held-out questions: answer loss, perplexity, ROUGE-L and BLEU of the fine-tuned model and of the base"
tunesmith eval "$OUT/merged" --data "$OUT/identity-test.jsonl" --compare builtin:smollm2-135m-instruct \
    --max-samples "$EVAL_SAMPLES" --max-length 512 --max-new-tokens 64 --out "$OUT/eval"

step "for llama.cpp / Ollama / LM Studio: merged model -> one GGUF file (8-bit) and an Ollama Modelfile"
tunesmith convert gguf "$OUT/merged" "$OUT/smollm2-tunesmith.gguf" --type q8_0 --ollama

step "done"
echo "loss curve: $OUT/work/loss.png   checkpoint: $(cat "$OUT/work/last_checkpoint")   adapter: $OUT/hf"
echo "merged model: $OUT/merged   report (held-out loss and answers side by side): $OUT/eval/report.md"
echo "GGUF: $OUT/smollm2-tunesmith.gguf   Modelfile: $OUT/Modelfile (ollama create smollm2-tunesmith -f $OUT/Modelfile)"
