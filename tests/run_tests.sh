#!/usr/bin/env bash
# The whole test suite: set-up if needed (.venv, torch 2.13.0 CPU, the project with dev extras), then pytest.
# The demo models are built on first use into $ZENITH_CACHE (default ~/.cache/zenith-merge).
#
#   bash tests/run_tests.sh [PYTEST ARGS...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/merge/setup_mergekit.sh"
cd "$root"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$root/.venv/bin/python" -m pytest -q "$@"
