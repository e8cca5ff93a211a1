#!/usr/bin/env bash
# Shared helpers for the merge drivers. Source it: `source merge/utils.sh`.
#   log MSG...            timestamped line on stderr
#   timestamp             filter: prefix each line of stdin with the time
#   zenith ARGS...        the zenith-merge CLI from the project's .venv
#   cleanup DIR [--all]   remove half-written temp files from an output folder (--all: the folder itself)
#   monitor start LOG [SECONDS] / monitor stop
#                         sample disk, memory and (when present) GPU use into LOG in the background

ZENITH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ZENITH_VENV="${ZENITH_VENV:-$ZENITH_ROOT/.venv}"

log() { printf '[%s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }

timestamp() { while IFS= read -r line; do printf '[%s] %s\n' "$(date '+%H:%M:%S')" "$line"; done; }

zenith() { "$ZENITH_VENV/bin/zenith-merge" "$@"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

cleanup() {
  local dir="${1:?usage: cleanup DIR [--all]}"
  [[ -d "$dir" ]] || { log "cleanup: $dir does not exist"; return 0; }
  if [[ "${2:-}" == "--all" ]]; then
    log "cleanup: removing $dir"
    rm -rf -- "$dir"
    return 0
  fi
  local n
  n=$(find "$dir" -maxdepth 2 -name '.*.tmp' -type f | wc -l)
  find "$dir" -maxdepth 2 -name '.*.tmp' -type f -delete
  log "cleanup: removed $n temp files from $dir (finished shards and the manifest are kept)"
}

_monitor_sample() {
  local target="$1"
  printf '%s disk=%s mem_used_mb=%s' "$(date '+%H:%M:%S')" \
    "$(df -h --output=avail "$target" 2>/dev/null | tail -1 | tr -d ' ')avail" \
    "$(free -m | awk '/^Mem:/ {print $3}')"
  if has_gpu; then
    printf ' gpu=%s' "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits | tr '\n' ';' | tr -d ' ')"
  fi
  printf '\n'
}

monitor() {
  case "${1:-}" in
    start)
      local out="${2:?usage: monitor start LOG [SECONDS]}" every="${3:-10}"
      ( while true; do _monitor_sample "$(dirname "$out")" >>"$out"; sleep "$every"; done ) &
      ZENITH_MONITOR_PID=$!
      log "monitor: sampling every ${every}s into $out (pid $ZENITH_MONITOR_PID)"
      ;;
    stop)
      if [[ -n "${ZENITH_MONITOR_PID:-}" ]]; then kill "$ZENITH_MONITOR_PID" 2>/dev/null || true; unset ZENITH_MONITOR_PID; fi
      ;;
    *) echo "usage: monitor start LOG [SECONDS] | monitor stop" >&2; return 2 ;;
  esac
}
