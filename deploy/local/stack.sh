#!/usr/bin/env bash
# Starts or stops the local stack: Redis and the Tansu broker (sqlite
# storage) on loopback, with pid files and logs in a run directory.
#
#   stack.sh up   [RUN_DIR]   start (idempotent) and wait until both answer
#   stack.sh down [RUN_DIR]   stop exactly the processes `up` started (by pid)
#
# Ports: REDIS_PORT (default 16379), KAFKA_PORT (default 19092).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cmd=${1:?usage: stack.sh up|down [RUN_DIR]}
run_dir=${2:-$root/.run/stack}
REDIS_PORT=${REDIS_PORT:-16379}
KAFKA_PORT=${KAFKA_PORT:-19092}
tansu="$root/.tools/bin/tansu"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {
  local pidfile=$1 name=$2
  if alive "$pidfile"; then
    local pid; pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "stack: stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

case "$cmd" in
  up)
    mkdir -p "$run_dir"
    if ! alive "$run_dir/redis.pid"; then
      # setsid: a Ctrl-C in the terminal reaches only the binaries; `down`
      # stops these after them, by pid.
      setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --hash-max-listpack-value 128 \
        --dir "$run_dir" --logfile "$run_dir/redis.log" --daemonize no &
      echo $! > "$run_dir/redis.pid"
    fi
    if ! alive "$run_dir/tansu.pid"; then
      (cd "$run_dir" && exec setsid "$tansu" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine "sqlite://tansu.db" >"$run_dir/tansu.log" 2>&1) &
      echo $! > "$run_dir/tansu.pid"
    fi
    for _ in $(seq 1 100); do
      redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli -p "$REDIS_PORT" ping >/dev/null || { echo "stack: redis did not start (see $run_dir/redis.log)"; exit 1; }
    for _ in $(seq 1 150); do
      "$tansu" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1 && break
      sleep 0.2
    done
    "$tansu" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1 \
      || { echo "stack: tansu did not answer a metadata request (see $run_dir/tansu.log)"; exit 1; }
    # The index Tansu 0.6's sqlite schema lacks (see the .sql file).
    sqlite3 -cmd ".timeout 10000" "$run_dir/tansu.db" < "$root/deploy/local/tansu-header-index.sql" \
      || { echo "stack: could not index Tansu headers in $run_dir/tansu.db"; exit 1; }
    echo "stack: redis 127.0.0.1:$REDIS_PORT, kafka 127.0.0.1:$KAFKA_PORT (run dir $run_dir)"
    ;;
  down)
    stop_pid "$run_dir/tansu.pid" tansu
    stop_pid "$run_dir/redis.pid" redis
    ;;
  *)
    echo "usage: stack.sh up|down [RUN_DIR]" >&2; exit 2 ;;
esac
