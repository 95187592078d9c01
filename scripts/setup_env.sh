#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install unimm into it, with the pinned torch.
# Idempotent: it reinstalls only when pyproject.toml or this script changed since the last install.
# Sourced by scripts/demo.sh and scripts/test.sh; afterwards $UNIMM_PYTHON is the environment's python.
set -euo pipefail
repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UNIMM_VENV:-$repository_root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.unimm-install-stamp"
wanted="$(cat "$repository_root/pyproject.toml" "$repository_root/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    echo "setup: installing torch 2.14.1 / torchvision 0.29.1 and unimm[dev] (a few minutes the first time)" >&2
    # torch first and pinned: the CPU-only 2.13 wheel breaks the PyPI torchvision that timm and lpips need.
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
    "$venv/bin/pip" install --quiet --disable-pip-version-check -e "$repository_root[dev]"
    echo "$wanted" > "$stamp"
fi
export UNIMM_PYTHON="$venv/bin/python"
export PATH="$venv/bin:$PATH"
