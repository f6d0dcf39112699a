#!/usr/bin/env bash
# `make run`: installs what is missing, starts Redis + Tansu, creates the
# topics, generates dev secrets, starts hooklog-ingest, hooklog-processor and
# the deliverer (hooklog-processor deliver)
# with deploy/local/hooklog.toml, and stops everything it started on Ctrl-C.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
run_dir="$root/.run/local"
mkdir -p "$run_dir"
PROFILE=${PROFILE:-release}

deploy/local/install.sh
if [ "$PROFILE" = release ]; then cargo build --release --bins; else cargo build --bins; fi
bin="$root/target/$PROFILE"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  deploy/local/stack.sh down "$run_dir/stack"
  echo "run: everything stopped"
}
trap cleanup INT TERM EXIT

deploy/local/stack.sh up "$run_dir/stack"

# Dev secrets, generated once per checkout, never committed (.run/ is ignored).
if [ ! -f "$run_dir/secrets.env" ]; then
  umask 077
  {
    echo "FULFILLMENT_WEBHOOK_SECRET=$(openssl rand -hex 24)"
    echo "ACCOUNTS_WEBHOOK_SECRET=$(openssl rand -hex 24)"
    echo "STRIPE_WEBHOOK_SECRET=whsec_$(openssl rand -hex 16)"
    echo "GITHUB_WEBHOOK_SECRET=$(openssl rand -hex 20)"
    echo "SLACK_SIGNING_SECRET=$(openssl rand -hex 16)"
    echo "SHOPIFY_WEBHOOK_SECRET=$(openssl rand -hex 16)"
    echo "RESEND_WEBHOOK_SECRET=whsec_$(openssl rand -base64 24)"
    echo "HOOKLOG_API_KEY=$(openssl rand -hex 24)"
    echo "HOOKLOG_ADMIN_KEY=$(openssl rand -hex 24)"
  } > "$run_dir/secrets.env"
fi
# Checkouts from before the deliverer or the admin keys lack those keys.
for key in HOOKLOG_API_KEY HOOKLOG_ADMIN_KEY; do
  grep -q "^$key=" "$run_dir/secrets.env" || echo "$key=$(openssl rand -hex 24)" >> "$run_dir/secrets.env"
done
set -a
# shellcheck disable=SC1091
. "$run_dir/secrets.env"
set +a
export HOOKLOG_CONFIG="$root/deploy/local/hooklog.toml"

"$bin/hooklog-processor" create-topics
"$bin/hooklog-processor" >"$run_dir/processor.log" 2>&1 &
pids+=($!)
"$bin/hooklog-ingest" >"$run_dir/ingest.log" 2>&1 &
pids+=($!)
"$bin/hooklog-processor" deliver >"$run_dir/deliverer.log" 2>&1 &
pids+=($!)

for url in http://127.0.0.1:8080/healthz http://127.0.0.1:8081/healthz http://127.0.0.1:8082/healthz; do
  for _ in $(seq 1 100); do curl -fs "$url" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fs "$url" >/dev/null || { echo "run: $url did not answer; logs in $run_dir"; exit 1; }
done

cat <<MSG

Hooklog is running.
  ingest     http://127.0.0.1:8080/webhooks/{source}   (/healthz /readyz /metrics)
  processor  http://127.0.0.1:8081/v1/projections       (/healthz /readyz /metrics; rebuilds: Bearer \$HOOKLOG_ADMIN_KEY)
  delivery   http://127.0.0.1:8082/api/v1/webhooks      (/healthz /readyz /metrics; Bearer \$HOOKLOG_API_KEY)
  logs       $run_dir/ingest.log, $run_dir/processor.log, $run_dir/deliverer.log
  secrets    $run_dir/secrets.env (dev only)

Send the seed's signed order.shipped webhook and read the projection:

  deploy/local/send-example.sh

Ctrl-C stops everything started here.
MSG
wait
