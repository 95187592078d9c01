#!/usr/bin/env bash
# Miniature replication of PS-VAE Table 4 (docs/embedded_default.md): four tokenizers under one budget --
# mini-vae (pixel VAE), mini-rae (frozen encoder features), mini-svae (semantic VAE, stage 1) and mini-psvae
# (both stages) -- then, on each, a text-to-image model (configs/t2i/mini-shapes.yaml with the tokenizer
# swapped, the same steps and batch) and an editing model started from it; reconstruction (PSNR/SSIM),
# linear probes, ShapesGenEval, ShapesDPG and ShapesEdit in one table: $ROOT/table.md.
# It runs in three phases over all tokenizers (tokenizers and their metrics; text-to-image; editing), so a
# partly finished comparison already has whole columns. Every step is skipped when its output exists and
# training resumes, so re-running continues.
# Knobs (all optional):
#   ROOT (default runs/table4); TOKENIZERS (default: the four above).
#   Budget: TOKENIZER_STEPS (steps of the paper's stages, default the presets' 5500; mini-psvae splits them
#   3:8 between its stages as its preset does), DECODER_STEPS (the decoder stage, default the presets' 2500),
#   T2I_STEPS and EDIT_STEPS (default mini-shapes' 4000), NUM_EDIT (edit pairs, default 20000).
#   TOKENIZER_OVERRIDES, T2I_OVERRIDES, EDIT_OVERRIDES: appended to the respective training commands (e.g.
#   T2I_OVERRIDES="train.batch_size=256 train.mixed_precision=bf16" on a GPU); EVAL_ARGS: appended to the
#   Shapes-suite evaluations (e.g. "--samples 1").
set -euo pipefail

main() {
  cd "$(dirname "$0")/.."
  [ -n "${UNIMM_SKIP_SETUP:-}" ] || source scripts/setup_env.sh
  local tok dir
  root="${ROOT:-runs/table4}"
  tokenizers="${TOKENIZERS:-mini-vae mini-rae mini-svae mini-psvae}"
  stage "shared inputs: Shapes dataset, encoder, text model"
  [ -d runs/shapes-tok/t2i/val ] || unimm shapes dataset --workers "$(nproc)" -o runs/shapes-tok --config configs/shapes/tokenizer.yaml
  [ -f runs/shapes-encoder/model.safetensors ] || unimm shapes train-encoder --config configs/shapes/encoder.yaml
  [ -f runs/shapes-text-model/config.json ] || unimm shapes text-model -o runs/shapes-text-model

  for tok in $tokenizers; do
    dir="$root/$tok"
    stage "$tok: tokenizer and its metrics"
    [ -f "$dir/tokenizer/model.safetensors" ] || unimm train-tokenizer --config "$tok" output_dir="$dir" \
      $(tokenizer_budget "$tok") ${TOKENIZER_OVERRIDES:-}
    [ -f "$dir/recon.json" ] || unimm eval recon --tokenizer "$dir/tokenizer" --data runs/shapes-tok/t2i/val --no-fid --no-lpips \
      --out "$dir/recon.json"
    [ -f "$dir/probe.json" ] || unimm eval linprobe --tokenizer "$dir/tokenizer" --train runs/shapes-tok/t2i/train \
      --val runs/shapes-tok/t2i/val --max-train 4000 --out "$dir/probe.json"
    [ -f "$dir/ceiling.json" ] || unimm eval shapes --tokenizer "$dir/tokenizer" --suites ceiling --out "$dir/ceiling.json"
  done

  for tok in $tokenizers; do
    dir="$root/$tok"
    stage "$tok: text-to-image model"
    cache "$dir" "$dir/t2i-latents" --data runs/shapes-tok/t2i/train caption_fields=[txt]
    [ -f "$dir/t2i/pipeline/generator.safetensors" ] || unimm train --config mini-shapes tokenizer="$dir/tokenizer" \
      output_dir="$dir/t2i" train.data="$dir/t2i-latents" ${T2I_STEPS:+train.steps=$T2I_STEPS} ${T2I_OVERRIDES:-}
    [ -f "$dir/t2i/shapes.json" ] || unimm eval shapes --model "$dir/t2i/pipeline" --suites geneval,dpg \
      --out "$dir/t2i/shapes.json" ${EVAL_ARGS:-}
  done

  stage "edit pairs"
  [ -f "$root/edit-data/dpg_shapes.csv" ] || unimm shapes dataset --workers "$(nproc)" -o "$root/edit-data" num_train=0 num_val=0 \
    num_edit_train="${NUM_EDIT:-20000}" num_edit_val=0 write_parquet=false samples_per_shard=4000 num_dpg_items=1
  for tok in $tokenizers; do
    dir="$root/$tok"
    stage "$tok: editing model"
    cache "$dir" "$dir/edit-latents" --data "$root/edit-data/edit/train" --kind edit --format parquet
    [ -f "$dir/edit/pipeline/generator.safetensors" ] || unimm train --config mini-shapes tokenizer="$dir/tokenizer" \
      output_dir="$dir/edit" train.task=edit train.data="$dir/edit-latents" train.init_from="$dir/t2i/pipeline" \
      train.sample_every=0 ${EDIT_STEPS:+train.steps=$EDIT_STEPS} ${EDIT_OVERRIDES:-}
    [ -f "$dir/edit/shapes.json" ] || unimm eval shapes --model "$dir/edit/pipeline" --suites edit --edit-pairs 140 \
      --out "$dir/edit/shapes.json" ${EVAL_ARGS:-}
  done
  stage "table"
  # shellcheck disable=SC2086  # the tokenizer list is meant to split into names
  unimm eval tokenizer-table --root "$root" $tokenizers | tee "$root/table.md"
}

stage() { echo "== $(date +%H:%M:%S) $*"; }

tokenizer_budget() {  # tokenizer_budget PRESET: the stage-step overrides that put PRESET on the chosen budget
  local steps="${TOKENIZER_STEPS:-}" stage1
  [ -z "${DECODER_STEPS:-}" ] || echo "train.decoder.steps=$DECODER_STEPS"
  [ -n "$steps" ] || return 0
  if [ "$1" = mini-psvae ]; then
    stage1=$(( steps * 3 / 11 ))  # the preset's 1500 : 4000 split of its 5500 steps
    echo "train.stage1.steps=$stage1 train.stage2.steps=$(( steps - stage1 ))"
  else
    echo "train.stage1.steps=$steps"
  fi
}

cache() {  # cache RUN OUT ARGS...: a latent cache made with RUN's tokenizer, unless a complete one is there
  local run="$1" out="$2"; shift 2
  grep -qs '"complete": true' "$out/manifest.json" || unimm cache-latents --tokenizer "$run/tokenizer" -o "$out" \
    --batch-size 256 "$@"
}

main
