//! The seed scenarios' payloads, and raw events built without ingest for
//! tests that need many records fast.

use hooklog_schemas::WebhookEvent;

/// The seed FulfillmentAgent `order.shipped` body (no id: body-hash id).
pub const SEED_ORDER_SHIPPED: &str = r#"{"event_type":"order.shipped","order_id":"ORD-633261","shipping_carrier":"FedEx","tracking_number":"1ZBPWJXU5C9BPQBMCI","shipped_at":"2025-03-01T12:00:00Z"}"#;

/// A Stripe `charge.succeeded` event body.
pub fn stripe_charge(
    event_id: &str,
    charge_id: &str,
    customer: &str,
    amount: i64,
    created: i64,
) -> String {
    format!(
        r#"{{"id":"{event_id}","object":"event","api_version":"2024-06-20","created":{created},"data":{{"object":{{"id":"{charge_id}","object":"charge","amount":{amount},"currency":"usd","customer":"{customer}","status":"succeeded","payment_intent":"pi_{charge_id}"}}}},"livemode":false,"pending_webhooks":1,"type":"charge.succeeded"}}"#
    )
}

/// The seed Stripe event, `evt_1H6XgJ2eZvKYlo2CnQ7v2xY7`.
pub fn seed_stripe_charge(customer: &str) -> String {
    stripe_charge(
        "evt_1H6XgJ2eZvKYlo2CnQ7v2xY7",
        "ch_1H6XgJ2eZvKYlo2C0Lq5sJgQ",
        customer,
        2000,
        1_740_830_400,
    )
}

/// A FulfillmentAgent `order.shipped` body, shaped like the seed's.
pub fn order_shipped(order_id: &str, shipped_at: &str) -> String {
    format!(
        r#"{{"event_type":"order.shipped","order_id":"{order_id}","shipping_carrier":"FedEx","tracking_number":"1Z{order_id}","shipped_at":"{shipped_at}"}}"#
    )
}

/// A FulfillmentAgent `order.delivered` body.
pub fn order_delivered(order_id: &str, delivered_at: &str) -> String {
    format!(
        r#"{{"event_type":"order.delivered","order_id":"{order_id}","delivered_at":"{delivered_at}"}}"#
    )
}

/// A `customer.signed_up` event from our accounts agent.
pub fn customer_signed_up(event_id: &str, customer: &str, email: &str) -> String {
    format!(
        r#"{{"event_id":"{event_id}","event_type":"customer.signed_up","customer_id":"{customer}","email":"{email}","plan":"pro","signed_up_at":"2025-02-28T09:30:00Z"}}"#
    )
}

/// A raw event as ingest would publish it.
pub fn raw(
    source: &str,
    scheme: &str,
    event_id: &str,
    event_type: &str,
    body: &str,
) -> WebhookEvent {
    WebhookEvent {
        event_id: event_id.into(),
        source: source.into(),
        scheme: scheme.into(),
        event_type: event_type.into(),
        body: body.as_bytes().to_vec(),
        headers: vec![],
        provider_timestamp: None,
        received_at_ms: 1_740_830_400_000,
        key_id: 0,
    }
}
