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
