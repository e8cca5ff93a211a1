#!/usr/bin/env bash
# Smoke-test a merged folder: structure, sha256s, finite values, config/tokenizer agreement,
# load with transformers and generate.
#
#   bash merge/test_merged_model.sh [DIR] [--no-generate]     # DIR defaults to ./merged_model
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/utils.sh"
case "${1:-}" in -h|--help) sed -n '2,5p' "$0"; exit 0 ;; esac
dir="./merged_model"
if [[ $# -gt 0 && "$1" != -* ]]; then dir="$1"; shift; fi
bash "$here/setup_mergekit.sh" >/dev/null
zenith smoke-test "$dir" "$@"
