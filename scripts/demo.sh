#!/usr/bin/env bash
# The README's first command: set up, then run the main job on the embedded default (the Shapes world):
# `unimm demo` samples a gallery of prompts and edits from the shipped, trained Shapes models
# (checkpoints/shapes), writes a contact sheet and an HTML page, and prints the models' measured scores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
out="${1:-runs/demo}"

unimm demo -o "$out"
echo
echo "Next: \`unimm generate \"a photo of two red circles\" -o out.png\`, \`unimm edit in.png \"Make the circle blue.\" -o out.png\`,"
echo "the Shapes world itself (\`unimm shapes render --count 8 -o scenes.png\`, \`unimm shapes check\`), and"
echo "docs/embedded_default.md for how the shipped models were trained."
