#!/usr/bin/env bash
# The Shapes-world text-to-image experiment on a CPU (docs/generator.md, "Miniature run"): the Shapes text
# model -> a latent cache of the Shapes training split made with the mini PS-VAE -> the mini generator ->
# GenEval on the Shapes world scored by the exact judge. It needs the mini PS-VAE of scripts/mini_tokenizers.sh.
# Every step resumes or is skipped when its output exists; re-run to continue an interrupted training run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

[ -f runs/mini-psvae/tokenizer/config.json ] || { echo "run scripts/mini_tokenizers.sh first (it trains runs/mini-psvae)" >&2; exit 2; }
[ -f runs/shapes-text-model/config.json ] || unimm shapes text-model -o runs/shapes-text-model
[ -f runs/shapes-latents/manifest.json ] && grep -q '"complete": true' runs/shapes-latents/manifest.json || \
  unimm cache-latents --tokenizer runs/mini-psvae/tokenizer --data runs/shapes-tok/t2i/train -o runs/shapes-latents \
    caption_fields=[txt] image_fields=[png]
[ -f runs/mini-t2i/pipeline/generator.safetensors ] || unimm train --config mini-shapes > runs/mini-t2i.log 2>&1
unimm eval shapes --model runs/mini-t2i/pipeline --suites geneval --tags single_object,colors --samples 4 \
  --out runs/mini-t2i/shapes-geneval.json
