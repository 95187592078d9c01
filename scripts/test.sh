#!/usr/bin/env bash
# The README's second command (and what CI runs): set up, lint, run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
ruff check .
python -m pytest -q "$@"
