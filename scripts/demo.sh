#!/usr/bin/env bash
# The README's first command: set up, then run the main job on the embedded default (the Shapes world).
# Today that is: render a Shapes dataset in the real corpora's layouts, show scenes, and have the
# program judge score the dataset, held-out renders and the GenEval-format prompt file.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
out="${1:-runs/demo}"

echo "== 1. Shapes dataset (webdataset + parquet text-to-image shards, OmniEdit-layout edit pairs, prompt files)"
unimm shapes dataset --config configs/shapes/demo.yaml -o "$out/shapes"
echo
echo "== 2. Eight random scenes at 256 px -> $out/scenes.png, with their short captions"
unimm shapes render --count 8 --resolution 256 --seed 7 -o "$out/scenes.png"
echo
echo "== 3. One scene at 64 px -> $out/scene.png; the program judge reads its objects back from the pixels"
unimm shapes render --count 1 --resolution 64 --seed 28 -o "$out/scene.png"
unimm shapes judge "$out/scene.png" --spec '{"include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a red circle"}'
echo
echo "== 4. The judge scoring the dataset, held-out renders and GenEval-format prompts"
unimm shapes check --scenes 60 --dataset "$out/shapes/t2i/val"
echo
echo "== 5. Tokenizer presets built on the meta device (no weights): parameters, latent shape, shift"
for preset in psvae-96c rae-dinov2-b sae-dinov3-hplus-k1 gae-d32 mini-psvae; do
  unimm info "$preset" --json
done
echo "   (the Shapes tokenizer experiment itself: bash scripts/mini_tokenizers.sh, about 2.5 h on 2 CPU cores)"
echo
echo "Done. Outputs are in $out/"
