#!/usr/bin/env bash
# Smoke-test a merged folder: structure, sha256s, finite values, config/tokenizer agreement,
# special tokens, load with transformers (every weight found) and generate; report.json and
# report.md (with the routing heatmap) go into the folder. --interactive: chat with the model.
#
#   bash merge/test_merged_model.sh [DIR] [--no-generate]     # DIR defaults to ./merged_model
#   bash merge/test_merged_model.sh [DIR] --interactive        # /think and /no_think work in messages
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/utils.sh"
case "${1:-}" in -h|--help) sed -n '2,7p' "$0"; exit 0 ;; esac
dir="./merged_model"
if [[ $# -gt 0 && "$1" != -* ]]; then dir="$1"; shift; fi
bash "$here/setup_mergekit.sh" >/dev/null
if [[ "${1:-}" == "--interactive" ]]; then
  shift
  zenith chat "$dir" "$@"
else
  zenith smoke-test "$dir" "$@"
fi
