#!/usr/bin/env bash
# The main job, from a fresh machine: install, initialise a small model, generate from it, then serve it over
# the OpenAI API and ask it a question with the official client.
CAIRN_EXTRAS=test source "$(dirname "$0")/env.sh"
OUT=${1:-out/demo-model}
cairn init-model "$OUT" --shape small --seed 0
echo "--- cairn generate (random weights: expect word salad, not sense)"
cairn generate "$OUT" --prompt "The river starts as a spring" --max-tokens 32 --ignore-eos --json
echo "--- cairn serve + the openai client"
python examples/demo_client.py "$OUT"
echo "--- the training life cycle: pretrain on text, SFT on Q&A, DPO with LoRA (examples/train/*.yaml)"
if [ "$OUT" = out/demo-model ]; then
    rm -rf out/pretrained out/sft out/dpo
    python -m cairn.models.corpus out/corpus.txt
    cairn train examples/train/pretrain.yaml --no-progress
    cairn train examples/train/sft.yaml --no-progress
    cairn train examples/train/dpo.yaml --no-progress
    echo "How many bridges cross the river in Brackenmoor?" | cairn chat out/dpo --temperature 0
fi
