#!/usr/bin/env bash
# Profiles one Hooklog binary under the benchmark's own load and draws a
# flamegraph, so that the claims in bench/limits.md can be checked on any
# machine:
#
#   bench/profile.sh ingest      # hooklog-ingest during its first load turn
#   bench/profile.sh processor   # hooklog-processor applying 600,000 records
#
# Writes bench/profiles/<what>-<UTC time>.svg (git-ignored) and prints the
# functions with the most samples of their own. PROFILE_SECS sets how long
# perf records (default 4). Needs perf (Debian: linux-perf) and the right to
# use it (root, or kernel.perf_event_paranoid <= 1); inferno, which draws the
# flamegraph, is installed into .tools/ on first use. The benchmark is
# stopped once the recording ends, and writes nothing under docs/ or
# bench/results/ (BENCH_NO_WRITE).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
what=${1:-}
secs=${PROFILE_SECS:-4}
case $what in
  ingest | processor) ;;
  *)
    echo "usage: bench/profile.sh ingest|processor" >&2
    exit 2
    ;;
esac
if ! command -v perf > /dev/null; then
  echo "profile: perf is missing (Debian: apt-get install linux-perf)" >&2
  exit 1
fi
export PATH="$root/.tools/bin:$PATH"
if ! command -v inferno-flamegraph > /dev/null; then
  cargo install inferno --version 0.12.8 --locked --root .tools
fi
deploy/local/install.sh
cargo build --release --workspace --bins

out=bench/profiles
mkdir -p "$out"
name="$what-$(date -u +%Y-%m-%dT%H-%M-%SZ)"
# Ingest's load turns last 7 s in the full run; the processor only needs its
# own part, long enough to outlast the recording.
if [ "$what" = processor ]; then
  export BENCH_QUICK=1 BENCH_RECORDS=${BENCH_RECORDS:-600000}
fi
BENCH_NO_WRITE=1 HOOKLOG_BIN_PROFILE=release TANSU_STORAGE=memory REDIS_APPENDFSYNC=everysec \
  target/release/hooklog-bench > "$out/$name.bench.log" 2>&1 &
bench=$!
# The bench's services watch its pid and stop with it.
trap 'kill "$bench" 2> /dev/null || true' EXIT

# Busy: at least 0.1 CPU-seconds in the last 0.2 s (clock ticks of 1/100 s).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2> /dev/null || echo 0; }
pid=""
for _ in $(seq 1 3000); do
  kill -0 "$bench" 2> /dev/null || {
    echo "profile: the benchmark ended early; see $out/$name.bench.log" >&2
    exit 1
  }
  # The newest such process: short-lived commands (create-topics) come and go.
  # (By command line: "hooklog-processor" is longer than a process name.)
  candidate=$(pgrep -n -f "^$root/target/release/hooklog-$what( |$)" || true)
  if [ -n "$candidate" ]; then
    before=$(cpu_ticks "$candidate")
    sleep 0.2
    if [ $(($(cpu_ticks "$candidate") - before)) -ge 10 ]; then
      pid=$candidate
      break
    fi
  else
    sleep 0.2
  fi
done
[ -n "$pid" ] || {
  echo "profile: hooklog-$what was never busy; see $out/$name.bench.log" >&2
  exit 1
}
sleep 1 # past the load's warm-up
echo "profile: recording hooklog-$what (pid $pid) for $secs s"
perf record -q -p "$pid" --call-graph dwarf,16384 -F 499 -o "$out/$name.perf.data" \
  -- sleep "$secs" > /dev/null
kill "$bench" 2> /dev/null || true

perf script -i "$out/$name.perf.data" 2> /dev/null |
  inferno-collapse-perf > "$out/$name.folded"
inferno-flamegraph --title "hooklog-$what under make bench's load" \
  < "$out/$name.folded" > "$out/$name.svg"
# sed, not head: reading to the end spares the pipe a SIGPIPE under pipefail.
perf report -i "$out/$name.perf.data" --no-children --sort dso,symbol \
  --percent-limit 1 --stdio -g none 2> /dev/null | grep '%' | cut -c1-120 | sed -n 1,25p || true
echo "profile: flamegraph $out/$name.svg"
