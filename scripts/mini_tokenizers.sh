#!/usr/bin/env bash
# The Shapes-world tokenizer experiment, end to end on a CPU (docs/tokenizer.md, "Miniature run"):
# data -> small representation encoder -> mini PS-VAE (two stages + decoder stage) and mini P-VAE -> reconstruction
# metrics, ShapesGenEval ceilings and linear probes; then the same at 96 channels with the linear read-out.
# Every step resumes or is skipped when its output exists; re-run to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

[ -d runs/shapes-tok/t2i/val ] || unimm shapes dataset -o runs/shapes-tok --config configs/shapes/tokenizer.yaml --workers 2
[ -f runs/shapes-encoder/model.safetensors ] || unimm shapes train-encoder --config configs/shapes/encoder.yaml \
  > runs/shapes-encoder.log 2>&1

# The PS-VAE first, on both cores (the generators need it); then the P-VAE control; then the 96-channel PS-VAE with
# the linear read-out term (ours, not the paper's) and its P-VAE control (docs/tokenizer.md, "The read-out at 96 channels").
presets="mini-psvae mini-pvae mini-psvae-readout-96c mini-pvae-96c"
for preset in $presets; do
  [ -f "runs/$preset/tokenizer/model.safetensors" ] || unimm train-tokenizer --config "$preset" > "runs/$preset.log" 2>&1
done

for preset in $presets; do
  unimm eval recon --tokenizer "runs/$preset/tokenizer" --data runs/shapes-tok/t2i/val --no-fid --no-lpips \
    --noise-sigmas 0,0.1,0.2,0.5 --out "runs/$preset/recon.json"
  unimm eval shapes --tokenizer "runs/$preset/tokenizer" --suites ceiling --out "runs/$preset/ceiling.json"
  unimm eval linprobe --tokenizer "runs/$preset/tokenizer" --train runs/shapes-tok/t2i/train \
    --val runs/shapes-tok/t2i/val --max-train 4000 --out "runs/$preset/probe.json"
done
unimm eval linprobe --encoder runs/shapes-encoder --train runs/shapes-tok/t2i/train \
  --val runs/shapes-tok/t2i/val --max-train 4000 --out runs/shapes-encoder/probe.json
