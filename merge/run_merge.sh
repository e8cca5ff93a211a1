#!/usr/bin/env bash
# Run the whole merge job with logging. With no arguments: the flagship config on the
# embedded demo models (set-up if needed, demo models built on first use, merge, smoke test).
#
#   bash merge/run_merge.sh                  # merge/config.yml
#   bash merge/run_merge.sh CONFIG [--output DIR] [--overwrite] [--no-generate]
#
# The log goes to logs/merge-<timestamp>.log (every line timestamped) as well as the terminal.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/utils.sh"

case "${1:-}" in -h|--help) sed -n '2,8p' "$0"; exit 0 ;; esac

mkdir -p "$ZENITH_ROOT/logs"
logfile="$ZENITH_ROOT/logs/merge-$(date '+%Y%m%d-%H%M%S').log"
exec > >(timestamp | tee -a "$logfile") 2>&1

log "zenith-merge run; log: $logfile"
log "host $(hostname), $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB memory"
if has_gpu; then
  log "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | paste -sd ';')"
else
  log "no GPU found: running on CPU"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
bash "$here/merge_models.sh" "$@"
