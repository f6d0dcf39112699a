#!/usr/bin/env bash
# `make test` after lint: builds the binaries the end-to-end tests spawn,
# runs every unit and end-to-end test (the heavy multi-replica test alone,
# last), and closes with one summary line.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
CARGO=${CARGO:-cargo}
THREADS=${TEST_THREADS:-4}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
$CARGO build --workspace --bins
set +e
$CARGO test --workspace -- --test-threads="$THREADS" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 0 ]; then
  # The 3 x 3 replica test (20,000 events, kill -9, SIGTERM) on its own,
  # after the parallel suite: it needs the machine to itself.
  $CARGO test -p hooklog-e2e --test e2e scale -- --ignored --test-threads=1 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
if [ "$status" -eq 0 ]; then
  # Benchmark harness smoke run (a few hundred requests, no thresholds).
  BENCH_SMOKE=1 TANSU_STORAGE=memory $CARGO run -q -p hooklog-e2e --bin hooklog-bench || status=$?
fi
set -e
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
echo
echo "${passed} passed, ${failed} failed"
exit "$status"
