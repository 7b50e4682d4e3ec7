#!/bin/bash
# Redis time per call of a script run by EVALSHA (lua/lib.lua + the script, as the
# gateway sends it) against the same code in a function library called by FCALL, on a
# throwaway SKU: redis-benchmark, alternating, Redis time per call from INFO
# commandstats. Resets Redis's command statistics: run it with nothing else measuring.
#
#   bench/scripts/fcall-vs-evalsha.sh [ROUNDS]     (REDIS_PORT, N, C from the environment)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
P=${REDIS_PORT:-6390} N=${N:-100000} C=${C:-256} rounds=${1:-3}
R="redis-cli -p $P"
SKU="fcall-$(date +%s)"
k() { echo "fg:{$SKU}:$1"; }
KEYS9="$(k meta) $(k used) $(k deadlines) $(k uholds) $(k outbox) $(k comps) $(k churn) $(k rlog) $(k holds)"
# The SKU: stock 10^12, per-user limit 10^9, as the harness's ceiling defines it.
# shellcheck disable=SC2086
$R EVAL "$(cat lua/lib.lua <(echo) lua/load_sku.lua)" 9 $KEYS9 1000000000000 1000000000 600000 "" "" 0 16 0 1 "" 1000000000000 >/dev/null
SHA=$($R SCRIPT LOAD "$(cat lua/lib.lua <(echo) lua/reserve.lua)")
VSHA=$($R SCRIPT LOAD "$(cat lua/lib.lua <(echo) lua/view.lua)")
# The library: lib.lua once, each script a function (KEYS is no global there).
lib="$(mktemp)"
{ echo "#!lua name=fgbench"; sed 's/^local function sale_keys()/local function sale_keys(KEYS)/' lua/lib.lua; echo
  for s in reserve view; do
    echo "redis.register_function('fgbench_$s', function(KEYS, ARGV)"
    sed 's/sale_keys()/sale_keys(KEYS)/' "lua/$s.lua"; echo; echo "end)"
  done; } >"$lib"
$R -x FUNCTION LOAD REPLACE <"$lib" >/dev/null
ARGS="rbu__rand_int__ 1 rb__rand_int__ k__rand_int__ 86400000 300000 16"
IDEM="fg:{$SKU}:idem:15:rbu__rand_int__:k__rand_int__"
bench() { # label command...
  $R CONFIG RESETSTAT >/dev/null
  local rps
  rps=$(redis-benchmark -p "$P" -c "$C" -n "$N" -r 100000000 --csv "${@:2}" | tail -1 | cut -d'"' -f4)
  echo "$1: $rps calls/s, $($R INFO commandstats | grep -E 'cmdstat_(evalsha|fcall):' | grep -o 'usec_per_call=[0-9.]*')"
}
for round in $(seq "$rounds"); do
  # shellcheck disable=SC2086
  bench "round $round reserve EVALSHA" EVALSHA "$SHA" 10 $KEYS9 "$IDEM" $ARGS
  # shellcheck disable=SC2086
  bench "round $round reserve FCALL  " FCALL fgbench_reserve 10 $KEYS9 "$IDEM" $ARGS
  bench "round $round view    EVALSHA" EVALSHA "$VSHA" 2 "$(k holds)" "$(k r:x)" rid__rand_int__
  bench "round $round view    FCALL  " FCALL fgbench_view 2 "$(k holds)" "$(k r:x)" rid__rand_int__
done
$R FUNCTION DELETE fgbench >/dev/null
$R --scan --pattern "fg:{$SKU}*" | xargs -r $R UNLINK >/dev/null
rm -f "$lib"
