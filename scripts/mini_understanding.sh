#!/usr/bin/env bash
# Understanding retention in miniature (docs/understanding.md; PS-VAE §4.4 on the Shapes world): train a
# connector + tiny Qwen2 to answer questions about Shapes scenes on the frozen mini representation encoder,
# then swap in the encoder that the mini PS-VAE fine-tuned (LLM + connector frozen), then re-align only the
# connector; prints the before/after table. Needs runs/shapes-encoder and runs/mini-psvae from
# scripts/mini_tokenizers.sh. About 45 minutes on the 2-core CPU (39 + 5 min measured on one core beside another job).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
out="${1:-runs/mini-understanding}"

for needed in runs/shapes-encoder/config.json runs/mini-psvae/tokenizer/config.json; do
  [ -f "$needed" ] || { echo "missing $needed: run scripts/mini_tokenizers.sh first" >&2; exit 2; }
done
# 1. connector + LLM on the original (frozen) encoder; skipped when the model exists.
[ -f "$out/understanding.json" ] || unimm understanding train --encoder runs/shapes-encoder -o "$out" --device cpu
# 2. the PS-VAE-fine-tuned encoder swapped in: frozen, then connector re-aligned (+ the same re-alignment on the
#    original encoder as a control).
unimm understanding swap --model "$out" --encoder runs/mini-psvae/tokenizer --control --device cpu \
  --out "$out/retention.json" | tee "$out/retention.md"
