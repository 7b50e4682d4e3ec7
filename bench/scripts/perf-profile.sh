#!/bin/bash
# Native CPU profile of a gateway binary (perf, DWARF call graphs) under the harness's
# `soldout` phase and then `GET /healthz` (the `ceiling` phase), 60,000 users who send
# again; 5 s of each phase recorded mid-way. Prints each phase's requests/s and the
# gateway's sampled CPU time per request; the profiles stay in OUT for `perf report`.
#
#   bench/scripts/perf-profile.sh BINARY OUT [PORT]
#   perf report -i OUT/soldout.data --children --sort symbol -g none --stdio
# Needs perf, the dev servers (scripts/dev up) and a release flashgate-bench. A binary
# built with debug info (the release profile keeps it) gives named inlined frames.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$(realpath "$1")" out="$2" port="${3:-8131}"
mkdir -p "$out"
cd "$ROOT" && eval "$(scripts/dev env)"
FLASHGATE_LISTEN="127.0.0.1:$port" "$bin" serve >"$out/gateway.log" 2>&1 &
gateway=$!
trap 'kill -TERM $gateway 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
hz=997 seconds=5
for phase in soldout ceiling; do
  (sleep 7 && perf record -F $hz --call-graph dwarf,16384 -p $gateway -o "$out/$phase.data" \
    -- sleep $seconds) >"$out/$phase.perf.log" 2>&1 &
  recorder=$!
  target/release/flashgate-bench --base-url "http://127.0.0.1:$port" --phases $phase \
    --baseline none --warmup 2s --duration 15s --soldout-duration 15s --soldout-users 60000 \
    --end-sales --no-progress --output-dir "$out/run.$phase" >"$out/$phase.txt" 2>&1
  wait $recorder
  rate=$(sed -n 's/.*requests in .* = \([0-9]*\) req\/s.*/\1/p' "$out/$phase.txt" | head -1)
  samples=$(perf script -i "$out/$phase.data" -F period 2>/dev/null | wc -l)
  awk -v p=$phase -v r="$rate" -v s="$samples" -v hz=$hz -v t=$seconds \
    'BEGIN { printf "%s: %d requests/s, gateway CPU %.1f µs per request (%d samples)\n", p, r, s / hz / (r * t) * 1e6, s }'
done
