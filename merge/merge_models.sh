#!/usr/bin/env bash
# The merge chain: set-up -> plan -> merge -> update-config -> smoke test.
# Non-interactive; a failing stage stops the chain with its message.
#
#   bash merge/merge_models.sh [CONFIG] [--output DIR] [--overwrite] [--no-generate]
#
# By default the merge runs with --resume: shards a previous run of the same plan
# finished are kept, and a folder written from a different plan is refused (then
# pass --overwrite).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/utils.sh"

config="$here/config.yml"
output_args=() mode=(--resume) smoke_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --output) output_args=(--output "$2"); shift 2 ;;
    --overwrite) mode=(--overwrite); shift ;;
    --no-generate) smoke_args=(--no-generate); shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) config="$1"; shift ;;
  esac
done

stage() { log "== $1"; }
fail() { log "stage '$1' failed; the chain stops here"; exit 1; }

stage "set-up";        bash "$here/setup_mergekit.sh" || fail set-up
stage "plan";          zenith plan "$config" "${output_args[@]}" || fail plan
out="$(zenith plan "$config" "${output_args[@]}" --print-output-dir)"
stage "merge -> $out"; zenith merge "$config" "${output_args[@]}" "${mode[@]}" || fail merge
stage "update-config"; "$ZENITH_VENV/bin/python" "$here/update_config.py" "$out" || fail update-config
stage "smoke test";    zenith smoke-test "$out" "${smoke_args[@]}" || fail "smoke test"
log "done: $out"
