#!/usr/bin/env bash
# The Shapes-world tokenizer experiment, end to end on a CPU (docs/tokenizer.md, "Miniature run"):
# data -> small representation encoder -> mini PS-VAE (two stages) and mini P-VAE -> reconstruction
# metrics and linear probes. Every step resumes or is skipped when its output exists; re-run to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the two tokenizer runs share the machine's cores

[ -d runs/shapes-tok/t2i/val ] || unimm shapes dataset -o runs/shapes-tok --config configs/shapes/tokenizer.yaml
[ -f runs/shapes-encoder/model.safetensors ] || unimm shapes train-encoder --config configs/shapes/encoder.yaml

# The two tokenizers train side by side (one core each); each resumes from its latest checkpoint.
for preset in mini-psvae mini-pvae; do
  [ -f "runs/$preset/tokenizer/model.safetensors" ] || unimm train-tokenizer --config "$preset" > "runs/$preset.log" 2>&1 &
done
wait
# The PS-VAE's decoder stage: the pixel decoder alone, latent space kept (both cores; ~1 h here).
[ -f runs/mini-psvae-decoder/tokenizer/model.safetensors ] || OMP_NUM_THREADS=2 unimm train-tokenizer --config mini-psvae-decoder \
  > runs/mini-psvae-decoder.log 2>&1

for preset in mini-psvae mini-pvae mini-psvae-decoder; do
  unimm eval recon --tokenizer "runs/$preset/tokenizer" --data runs/shapes-tok/t2i/val --no-fid --no-lpips \
    --noise-sigmas 0,0.1,0.2,0.5 --out "runs/$preset/recon.json"
  unimm eval shapes --tokenizer "runs/$preset/tokenizer" --suites ceiling --out "runs/$preset/ceiling.json"
  [ "$preset" = mini-psvae-decoder ] && continue  # same latents as mini-psvae: same probe
  unimm eval linprobe --tokenizer "runs/$preset/tokenizer" --train runs/shapes-tok/t2i/train \
    --val runs/shapes-tok/t2i/val --max-train 4000 --out "runs/$preset/probe.json"
done
unimm eval linprobe --encoder runs/shapes-encoder --train runs/shapes-tok/t2i/train \
  --val runs/shapes-tok/t2i/val --max-train 4000 --out runs/shapes-encoder/probe.json
