#!/usr/bin/env bash
# Create .venv and install zenith-merge (with mergekit and the dev extras) into it.
# Idempotent: a second run only checks that the environment is complete and returns.
#
#   bash merge/setup_mergekit.sh            # CPU torch 2.13.0 from the local wheel, when no torch is present
#   ZENITH_KEEP_TORCH=1 bash merge/setup_mergekit.sh   # GPU clusters: keep the torch already in the venv/system
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${ZENITH_VENV:-$root/.venv}"
python_bin="${PYTHON:-python3}"
stamp="$venv/.zenith-installed"

# The stamp records the pyproject it was made from; a changed pyproject reinstalls.
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import zenith_merge, torch, mergekit" 2>/dev/null; then
  echo "[setup] $venv is up to date"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first, pinned: any other spec makes pip pull the CUDA build (gigabytes).
# A cluster that brings its own torch sets ZENITH_KEEP_TORCH=1 (or has torch in the venv already).
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [[ "${ZENITH_KEEP_TORCH:-0}" == "1" ]]; then
    echo "[setup] ZENITH_KEEP_TORCH=1 but no torch in $venv: install your torch first" >&2
    exit 1
  fi
  echo "[setup] installing torch==2.13.0"
  "${pip[@]}" "torch==2.13.0"
fi

echo "[setup] installing zenith-merge[dev] (mergekit, transformers, accelerate, bitsandbytes, ...)"
"${pip[@]}" -e "$root[dev]"
"$venv/bin/python" -c "import zenith_merge, torch, mergekit, transformers"
echo "$want" > "$stamp"
echo "[setup] done: $("$venv/bin/python" -c 'import torch,transformers,mergekit;print("torch",torch.__version__,"transformers",transformers.__version__)')"
