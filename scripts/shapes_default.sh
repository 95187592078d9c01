#!/usr/bin/env bash
# The embedded default's trained checkpoints (checkpoints/shapes/, docs/embedded_default.md): a 200k-image
# Shapes dataset with 70k edit pairs -> the Shapes text model -> latent caches made with the frozen mini
# PS-VAE -> the text-to-image model (configs/t2i/shapes-default.yaml) -> the editing model, started from it
# (configs/edit/shapes-default-edit.yaml) -> the Shapes suite on both -> `unimm export shapes-default` into
# checkpoints/shapes (CHECKPOINTS_OUT=DIR writes elsewhere). It needs the mini PS-VAE of
# scripts/mini_tokenizers.sh (runs/mini-psvae/tokenizer). The default presets are sized for one GPU: each training
# run stops at its time_limit_minutes (override with train.time_limit_minutes=0 to run all train.steps). On a CPU:
# T2I_CONFIG=shapes-default-cpu EDIT_CONFIG=shapes-default-edit-cpu NUM_TRAIN=100000 NUM_EDIT=50000
# T2I_CAPTIONS=[txt] (short captions only: the latent cache fixes which captions training draws from; hours; every
# step is skipped when its output exists and training resumes, so re-running continues an interrupted run).
# Usage: bash scripts/shapes_default.sh   (UNIMM_SKIP_SETUP=1 uses the current environment; for a quick smoke run,
# NUM_TRAIN/NUM_EDIT shrink the dataset, TRAIN_OVERRIDES are appended to both trainings, EVAL_ARGS to the evals)
set -euo pipefail

main() {
  cd "$(dirname "$0")/.."
  [ -n "${UNIMM_SKIP_SETUP:-}" ] || source scripts/setup_env.sh
  local run=runs/shapes-default workers
  workers="$(nproc)"
  [ -f runs/mini-psvae/tokenizer/config.json ] || { echo "run scripts/mini_tokenizers.sh first (it trains runs/mini-psvae)" >&2; exit 2; }

  stage "Shapes dataset: ${NUM_TRAIN:-200000} captioned images, ${NUM_EDIT:-70000} edit pairs ($workers processes)"
  [ -f "$run/data/dpg_shapes.csv" ] || unimm shapes dataset --workers "$workers" -o "$run/data" \
    num_train="${NUM_TRAIN:-200000}" num_val=1000 num_edit_train="${NUM_EDIT:-70000}" num_edit_val=700 samples_per_shard=10000 write_parquet=false
  stage "Shapes text model (the backbone's initialisation and word tokenizer)"
  [ -f "$run/text-model/config.json" ] || unimm shapes text-model -o "$run/text-model" \
    hidden_size=192 num_hidden_layers=6 num_attention_heads=6 num_key_value_heads=2 intermediate_size=576
  stage "latent caches (frozen mini PS-VAE)"
  cache "$run/t2i-latents" --data "$run/data/t2i/train" caption_fields="${T2I_CAPTIONS:-[txt,json.caption_llava]}"
  cache "$run/edit-latents" --data "$run/data/edit/train" --kind edit --format parquet
  stage "text-to-image training"
  [ -f "$run/t2i/pipeline/generator.safetensors" ] || unimm train --config "${T2I_CONFIG:-shapes-default}" ${TRAIN_OVERRIDES:-}
  stage "editing training (from the text-to-image pipeline) and the text-to-image Shapes suite, side by side"
  [ -f "$run/t2i/shapes.json" ] || unimm eval shapes --model "$run/t2i/pipeline" --suites geneval,dpg,ceiling \
    --out "$run/t2i/shapes.json" ${EVAL_ARGS:-} > "$run/t2i-eval.log" 2>&1 &
  [ -f "$run/edit/pipeline/generator.safetensors" ] || unimm train --config "${EDIT_CONFIG:-shapes-default-edit}" ${TRAIN_OVERRIDES:-}
  wait
  stage "editing Shapes suite"
  [ -f "$run/edit/shapes.json" ] || unimm eval shapes --model "$run/edit/pipeline" --suites edit --edit-pairs 350 \
    --out "$run/edit/shapes.json" ${EVAL_ARGS:-}
  stage "packaging as the shipped default (float16 weights, one shared tokenizer)"
  unimm export shapes-default --run "$run" -o "${CHECKPOINTS_OUT:-checkpoints/shapes}"
  stage "done"
}

stage() { echo "== $(date +%H:%M:%S) $*"; }

cache() {  # cache OUT ARGS...: write a latent cache unless a complete one is there
  local out="$1"; shift
  grep -qs '"complete": true' "$out/manifest.json" || unimm cache-latents --tokenizer runs/mini-psvae/tokenizer \
    -o "$out" --batch-size 512 --workers "$(( workers < 8 ? workers : 8 ))" "$@"
}

main
