#!/usr/bin/env bash
# Set-up and launcher in one: makes ./.venv on first use (needs only python3), installs requirements.txt into it,
# then runs the given command inside it.
#   bash env.sh python train.py            # the main job: the full pipeline on the built-in IMDb sample
#   bash env.sh python -m pytest -q tests  # the test suite
# torch: a torch that python3 already has (the GPU machine's, say) is kept: the venv sees the system's packages.
# Otherwise torch 2.13.0 is installed (the project also runs on torch 2.11, the GPU machine's).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.ready" ] || [ "$here/requirements.txt" -nt "$venv/.ready" ]; then
  echo "env.sh: making $venv from requirements.txt" >&2
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -c "import torch" 2>/dev/null ||
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
  touch "$venv/.ready"
fi
cd "$here"
export PATH="$venv/bin:$PATH"
[ $# -gt 0 ] || set -- python train.py
exec "$@"
