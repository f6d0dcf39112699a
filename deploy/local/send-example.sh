#!/usr/bin/env bash
# Sends the seed's FulfillmentAgent `order.shipped` webhook, signed with the
# generic scheme (hex HMAC-SHA256 of the raw body in X-Webhook-Signature),
# to a running `make run`, then reads the `orders` projection.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck disable=SC1091
. "$root/.run/local/secrets.env"
ORDER_ID=${ORDER_ID:-ORD-12345}
body=$(printf '{"event_type":"order.shipped","order_id":"%s","shipping_carrier":"FedEx","tracking_number":"1Z999AA10123456784","shipped_at":"%s"}' \
  "$ORDER_ID" "$(date -u +%Y-%m-%dT%H:%M:%SZ)")
sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$FULFILLMENT_WEBHOOK_SECRET" | awk '{print $NF}')
echo "POST /webhooks/fulfillment"
curl -sS -X POST http://127.0.0.1:8080/webhooks/fulfillment \
  -H 'Content-Type: application/json' \
  -H "X-Webhook-Signature: sha256=$sig" \
  --data-binary "$body"
echo
for _ in $(seq 1 50); do
  if state=$(curl -fsS "http://127.0.0.1:8081/v1/projections/orders/$ORDER_ID" 2>/dev/null); then
    echo "GET /v1/projections/orders/$ORDER_ID"
    echo "$state"
    exit 0
  fi
  sleep 0.1
done
echo "projection not updated yet; see .run/local/processor.log" >&2
exit 1
