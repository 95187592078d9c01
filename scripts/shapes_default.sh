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
# More knobs: RUN_DIR (default runs/shapes-default) holds every stage's output; DATA_OVERRIDES go to `unimm shapes
# dataset` (e.g. "spec_fraction=0.9 spec_tag_weights=[1,1,1,2,4,4]" for more relation and colour-binding captions);
# T2I_OVERRIDES / EDIT_OVERRIDES to one training each; SKIP_EDIT=1 stops after the text-to-image model and its suite.
# COOLDOWN_MINUTES=M: a time-limited training (train.time_limit_minutes) is resumed once more with its learning rate
# falling linearly to 0 over the steps it makes in M minutes at the speed its log shows (train.lr_schedule=wsd), so a
# time-boxed GPU run still ends cooled down.
# CONTINUE=1 trains the shipped models further instead of from scratch: the tokenizer is checkpoints/shapes/tokenizer
# (no scripts/mini_tokenizers.sh needed), the T2I and edit runs start from checkpoints/shapes/{t2i,edit}
# (train.init_from), and nothing is exported: compare the new shapes.json with checkpoints/shapes/scores.json and export
# with `unimm export shapes-default --t2i-run ... --edit-run ... --log-tag NAME` (docs/embedded_default.md).
set -euo pipefail

main() {
  cd "$(dirname "$0")/.."
  [ -n "${UNIMM_SKIP_SETUP:-}" ] || source scripts/setup_env.sh
  local run="${RUN_DIR:-runs/shapes-default}" workers t2i_start=() edit_start=()
  workers="$(nproc)"
  if [ -n "${CONTINUE:-}" ]; then
    [ -f runs/mini-psvae/tokenizer/config.json ] || { mkdir -p runs/mini-psvae && cp -r checkpoints/shapes/tokenizer runs/mini-psvae/tokenizer; }
    # The shipped T2I model's text-blind setting changes no parameter, so only its config says it: keep it.
    t2i_start=(train.init_from=checkpoints/shapes/t2i "model.text_blind_layers=$(python -c \
      'import json; print(json.load(open("checkpoints/shapes/t2i/generator_config.json"))["model"].get("text_blind_layers", 0))')")
    edit_start=(train.init_from=checkpoints/shapes/edit)
  else
    edit_start=(train.init_from="$run/t2i/pipeline")
  fi
  # The presets' paths are runs/shapes-default/...; RUN_DIR moves all of them.
  local paths=(model.backbone.name_or_path="$run/text-model")
  [ -f runs/mini-psvae/tokenizer/config.json ] || { echo "run scripts/mini_tokenizers.sh first (it trains runs/mini-psvae), or set CONTINUE=1" >&2; exit 2; }

  stage "Shapes dataset: ${NUM_TRAIN:-200000} captioned images, ${NUM_EDIT:-70000} edit pairs ($workers processes)"
  [ -f "$run/data/dpg_shapes.csv" ] || unimm shapes dataset --workers "$workers" -o "$run/data" \
    num_train="${NUM_TRAIN:-200000}" num_val=1000 num_edit_train="${NUM_EDIT:-70000}" num_edit_val=700 samples_per_shard=10000 \
    write_parquet=false ${DATA_OVERRIDES:-}
  stage "Shapes text model (the backbone's initialisation and word tokenizer)"
  [ -f "$run/text-model/config.json" ] || unimm shapes text-model -o "$run/text-model" \
    hidden_size=192 num_hidden_layers=6 num_attention_heads=6 num_key_value_heads=2 intermediate_size=576
  stage "latent caches (frozen mini PS-VAE)"
  cache "$run/t2i-latents" --data "$run/data/t2i/train" caption_fields="${T2I_CAPTIONS:-[txt,json.caption_llava]}"
  [ -n "${SKIP_EDIT:-}" ] || cache "$run/edit-latents" --data "$run/data/edit/train" --kind edit --format parquet
  stage "text-to-image training"
  train "$run/t2i" "${T2I_CONFIG:-shapes-default}" output_dir="$run/t2i" train.data="$run/t2i-latents" "${paths[@]}" \
    "${t2i_start[@]}" ${TRAIN_OVERRIDES:-} ${T2I_OVERRIDES:-}
  stage "text-to-image Shapes suite$([ -n "${SKIP_EDIT:-}" ] && echo " (SKIP_EDIT: no editing model)" || echo ", beside the editing training")"
  [ -f "$run/t2i/shapes.json" ] || unimm eval shapes --model "$run/t2i/pipeline" --suites geneval,dpg,ceiling \
    --out "$run/t2i/shapes.json" ${EVAL_ARGS:-} > "$run/t2i-eval.log" 2>&1 &
  if [ -z "${SKIP_EDIT:-}" ]; then
    # Continuing, the editor keeps its own weights; from scratch it starts from the new text-to-image pipeline (its preset).
    train "$run/edit" "${EDIT_CONFIG:-shapes-default-edit}" output_dir="$run/edit" train.data="$run/edit-latents" "${paths[@]}" \
      "${edit_start[@]}" ${TRAIN_OVERRIDES:-} ${EDIT_OVERRIDES:-}
  fi
  wait
  if [ -n "${SKIP_EDIT:-}" ]; then stage "done: $run/t2i/shapes.json"; return; fi
  stage "editing Shapes suite"
  [ -f "$run/edit/shapes.json" ] || unimm eval shapes --model "$run/edit/pipeline" --suites edit --edit-pairs 350 \
    --out "$run/edit/shapes.json" ${EVAL_ARGS:-}
  if [ -n "${CONTINUE:-}" ]; then
    stage "done: compare $run/t2i/shapes.json and $run/edit/shapes.json with checkpoints/shapes/scores.json before exporting"
    return
  fi
  stage "packaging as the shipped default (float16 weights, one shared tokenizer)"
  unimm export shapes-default --run "$run" -o "${CHECKPOINTS_OUT:-checkpoints/shapes}"
  stage "done"
}

stage() { echo "== $(date +%H:%M:%S) $*"; }

train() {  # train RUN CONFIG OVERRIDES...: train unless RUN has its pipeline; then the cool-down, if asked for
  local dir="$1" config="$2"; shift 2
  [ -f "$dir/pipeline/generator.safetensors" ] || unimm train --config "$config" "$@"
  [ -n "${COOLDOWN_MINUTES:-}" ] && [ ! -f "$dir/cooled-down" ] || return 0
  local plan
  plan="$(python - "$dir" "$COOLDOWN_MINUTES" <<'PLAN'
import json, sys
from pathlib import Path
run, minutes = Path(sys.argv[1]), float(sys.argv[2])
step = int((run / "latest").read_text().strip().removeprefix("checkpoint-"))  # where the time limit stopped it
records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines() if '"elapsed_s"' in line]
# The last invocation's speed: its records are the trailing stretch whose elapsed time (since that start) increases.
first = len(records) - 1
while first > 0 and records[first - 1]["elapsed_s"] < records[first]["elapsed_s"]:
    first -= 1
a, b = records[first], records[-1]
if b is not a:
    steps_per_second = (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])
else:  # one record: that invocation began where the one before it logged last (it saves a checkpoint there), or at 0
    steps_per_second = (b["step"] - (records[first - 1]["step"] if first > 0 else 0)) / b["elapsed_s"]
cooldown = max(int(steps_per_second * minutes * 60), 1)
print(step + cooldown, cooldown)
PLAN
)"
  set -- "$@" train.lr_schedule=wsd train.steps="${plan% *}" train.cooldown_steps="${plan#* }" train.time_limit_minutes=0
  echo "cool-down of $dir: ${plan#* } steps to step ${plan% *}"
  unimm train --config "$config" "$@" && touch "$dir/cooled-down"
}

cache() {  # cache OUT ARGS...: write a latent cache unless a complete one is there
  local out="$1"; shift
  grep -qs '"complete": true' "$out/manifest.json" || unimm cache-latents --tokenizer runs/mini-psvae/tokenizer \
    -o "$out" --batch-size 512 --workers "$(( workers < 8 ? workers : 8 ))" "$@"
}

main
