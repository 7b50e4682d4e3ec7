#!/bin/bash
# Instructions per reserve of a gateway binary, counted by callgrind (repeatable on a
# busy machine, unlike seconds). Runs the binary with its worker off under callgrind
# twice (a short and a long reserve phase), reads the reserves it served from its
# /metrics, and prints (Ir_long - Ir_short) / (reserves_long - reserves_short):
# start-up and set-up cancel out.
#
#   bench/scripts/callgrind-per-reserve.sh BINARY [PORT] [PHASE] [HARNESS FLAGS...]
# PHASE: reserve (default), or soldout (instructions per sold-out answer); e.g.
# `... soldout --soldout-users 1000` for users who send again.
# Needs valgrind, the dev servers (scripts/dev up) and a release flashgate-bench.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$(realpath "$1")" port="${2:-8095}" phase="${3:-reserve}"
extra=("${@:4}")
out="$(mktemp -d)"
cd "$ROOT" && eval "$(scripts/dev env)"
run() { # seconds -> "reserves instructions"
  FLASHGATE_NO_WORKER=1 FLASHGATE_LISTEN="127.0.0.1:$port" valgrind --tool=callgrind \
    --callgrind-out-file="$out/cg.$1.out" "$bin" serve >"$out/gateway.$1.log" 2>&1 &
  local vpid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.5; done
  target/release/flashgate-bench --base-url "http://127.0.0.1:$port" --phases "$phase" --baseline none \
    --duration "$1s" --soldout-duration "$1s" --warmup 3s --validate-sample 0 -c 32 --end-sales --no-progress \
    --output-dir "$out/run.$1" --gateway-pid "$vpid" --flush-timeout 1s "${extra[@]}" >"$out/bench.$1.txt" 2>&1 || true
  local n
  n=$(curl -s "http://127.0.0.1:$port/metrics" |
    awk '/^flashgate_requests_total\{route="\/v1\/skus\/\{sku\}\/reservations"/ {s += $2} END {print s}')
  kill -TERM "$vpid"; wait "$vpid" 2>/dev/null || true
  echo "$n $(awk '/^summary:/ {print $2}' "$out/cg.$1.out")"
}
read -r n1 ir1 < <(run 4)
read -r n2 ir2 < <(run 16)
echo "$bin: $(( (ir2 - ir1) / (n2 - n1) )) instructions per $phase request ($((n2 - n1)) reserves; callgrind files in $out)"
