#!/usr/bin/env bash
# The main job, from a fresh machine: install, initialise a small model, generate from it.
CAIRN_EXTRAS=test source "$(dirname "$0")/env.sh"
OUT=${1:-out/demo-model}
cairn init-model "$OUT" --shape small --seed 0
echo "--- cairn generate (greedy, random weights: expect word salad, not sense)"
cairn generate "$OUT" --prompt "The river starts as a spring" --max-tokens 32 --ignore-eos
echo "--- same, as JSON with timing"
cairn generate "$OUT" --prompt "The river starts as a spring" --max-tokens 32 --ignore-eos --json
