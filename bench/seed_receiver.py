"""The seed article's webhook receiver, as its users would run it: Flask
verifies X-Webhook-Signature (hex HMAC-SHA256 of the raw body), publishes the
raw event to Kafka with confluent-kafka and waits for the delivery report
before answering 200. Served by gunicorn, one sync worker per core.

Baseline for `make bench` only (bench/seed-requirements.txt); configured by
SEED_SECRET, SEED_BROKERS, SEED_TOPIC."""

import hashlib
import hmac
import json
import os

from confluent_kafka import Producer
from flask import Flask, abort, request

app = Flask(__name__)
SECRET = os.environ["SEED_SECRET"].encode()
TOPIC = os.environ["SEED_TOPIC"]
producer = Producer({"bootstrap.servers": os.environ["SEED_BROKERS"], "acks": "all"})


@app.post("/webhooks/<source>")
def webhook(source):
    body = request.get_data()
    signature = request.headers.get("X-Webhook-Signature", "")
    if signature.startswith("sha256="):
        signature = signature[len("sha256="):]
    expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        abort(401)
    event = json.loads(body)
    errors = []
    producer.produce(TOPIC, key=event.get("event_id"), value=body,
                     on_delivery=lambda err, msg: errors.append(err) if err else None)
    producer.flush(10)
    if errors:
        abort(503)
    return {"status": "received"}, 200
