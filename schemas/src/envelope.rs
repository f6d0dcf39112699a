//! The `WebhookEvent` Avro record (`schemas/webhook_event.avsc`) and its codec.
//!
//! Records use Avro *single-object encoding*: `C3 01`, the 8-byte CRC-64-AVRO
//! (Rabin) fingerprint of the writer schema, then the binary datum. The
//! fingerprint names the writer schema, so a reader can resolve old records
//! against a newer reader schema (see `docs/schema-evolution.md`).

use std::io::BufRead;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_avro_fast::de::DeserializerState;
use serde_avro_fast::ser::SerializerConfig;
use serde_avro_fast::Schema;

/// The schema text, compiled into both binaries.
pub const SCHEMA_JSON: &str = include_str!("../webhook_event.avsc");

// serde_avro_fast rather than apache-avro's generic `Value`: it walks a
// schema compiled once, borrows strings and bytes from the record instead
// of building a tree per event, and was ~5x faster per decode here; every
// processor and rebuild record goes through `decode`. apache-avro stays as
// the reference implementation the tests check this codec against.
static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    SCHEMA_JSON
        .parse()
        .expect("webhook_event.avsc is valid Avro")
});

const MAGIC: [u8; 2] = [0xC3, 0x01];

/// One verified webhook, as published by ingest to the raw topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEvent {
    /// Event id; also the Kafka record key.
    pub event_id: String,
    /// Configured source name.
    pub source: String,
    /// Signature scheme id that verified it.
    pub scheme: String,
    /// Provider event type, `""` when none.
    pub event_type: String,
    /// The raw body, byte for byte.
    pub body: Vec<u8>,
    /// Headers needed to re-verify (lower-case names).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Signed timestamp (Unix seconds) of timestamped schemes.
    pub provider_timestamp: Option<i64>,
    /// Receive time, Unix milliseconds.
    pub received_at_ms: i64,
    /// Index of the secret that verified (never the secret itself).
    pub key_id: i32,
}

/// The record as it is on the wire, borrowing from the event (encode) or
/// from the record bytes (decode). Fields in schema order.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    event_id: &'a str,
    source: &'a str,
    scheme: &'a str,
    event_type: &'a str,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    #[serde(borrow)]
    headers: Vec<WireHeader<'a>>,
    provider_timestamp: Option<i64>,
    received_at_ms: i64,
    key_id: i32,
}

#[derive(Serialize, Deserialize)]
struct WireHeader<'a> {
    name: &'a str,
    #[serde(with = "serde_bytes")]
    value: &'a [u8],
}

/// Why a record value could not be decoded. Such records are poison: they go
/// to the DLQ, because retrying would fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not single-object encoded.
    #[error("not an Avro single-object record (bad magic)")]
    BadMagic,
    /// Written with a schema this build does not know.
    #[error("unknown writer schema fingerprint")]
    UnknownSchema,
    /// The datum does not match the schema.
    #[error("invalid Avro datum: {0}")]
    Datum(String),
}

/// What routing and mapping an event read, borrowed from a record: a
/// replay decodes millions of records, and copying each body and its strings
/// was a tenth of a rebuild's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventView<'a> {
    /// Event id.
    pub event_id: &'a str,
    /// Configured source name.
    pub source: &'a str,
    /// Provider event type, `""` when none.
    pub event_type: &'a str,
    /// The raw body.
    pub body: &'a [u8],
    /// Receive time, Unix milliseconds.
    pub received_at_ms: i64,
}

/// Checks the single-object header and decodes the datum in place.
fn decode_wire(bytes: &[u8]) -> Result<Wire<'_>, DecodeError> {
    if bytes.len() < 10 || bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    // Only one schema version exists so far; an older version's
    // fingerprint would be matched here and its datum decoded with that
    // writer schema into `Wire` (docs/schema-evolution.md).
    if bytes[2..10] != WebhookEvent::fingerprint()[..] {
        return Err(DecodeError::UnknownSchema);
    }
    let mut state = DeserializerState::from_slice(&bytes[10..], &SCHEMA);
    let wire =
        Wire::deserialize(state.deserializer()).map_err(|e| DecodeError::Datum(e.to_string()))?;
    let mut rest = state.into_reader();
    if !rest.fill_buf().map_or(true, <[u8]>::is_empty) {
        return Err(DecodeError::Datum("trailing bytes after the record".into()));
    }
    Ok(wire)
}

impl WebhookEvent {
    /// The CRC-64-AVRO (Rabin) fingerprint of the schema, as written after
    /// the magic bytes of every record.
    pub fn fingerprint() -> &'static [u8; 8] {
        SCHEMA.rabin_fingerprint()
    }

    /// Encodes as an Avro single-object record.
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            event_id: &self.event_id,
            source: &self.source,
            scheme: &self.scheme,
            event_type: &self.event_type,
            body: &self.body,
            headers: self
                .headers
                .iter()
                .map(|(name, value)| WireHeader { name, value })
                .collect(),
            provider_timestamp: self.provider_timestamp,
            received_at_ms: self.received_at_ms,
            key_id: self.key_id,
        };
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(Self::fingerprint());
        serde_avro_fast::to_datum(&wire, out, &mut SerializerConfig::new(&SCHEMA))
            .expect("a WebhookEvent always matches its own schema")
    }

    /// Decodes a single-object record written with a known schema.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let wire = decode_wire(bytes)?;
        Ok(Self {
            event_id: wire.event_id.to_owned(),
            source: wire.source.to_owned(),
            scheme: wire.scheme.to_owned(),
            event_type: wire.event_type.to_owned(),
            body: wire.body.to_vec(),
            headers: wire
                .headers
                .into_iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect(),
            provider_timestamp: wire.provider_timestamp,
            received_at_ms: wire.received_at_ms,
            key_id: wire.key_id,
        })
    }

    /// Decodes like [`Self::decode`], borrowing from the record instead of
    /// copying its body and strings.
    pub fn decode_view(bytes: &[u8]) -> Result<EventView<'_>, DecodeError> {
        let wire = decode_wire(bytes)?;
        Ok(EventView {
            event_id: wire.event_id,
            source: wire.source,
            event_type: wire.event_type,
            body: wire.body,
            received_at_ms: wire.received_at_ms,
        })
    }

    /// This event as an [`EventView`].
    pub fn view(&self) -> EventView<'_> {
        EventView {
            event_id: &self.event_id,
            source: &self.source,
            event_type: &self.event_type,
            body: &self.body,
            received_at_ms: self.received_at_ms,
        }
    }

    /// The value of a stored request header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WebhookEvent {
        WebhookEvent {
            event_id: "evt_1".into(),
            source: "stripe".into(),
            scheme: "stripe".into(),
            event_type: "charge.succeeded".into(),
            body: vec![0xff, 0x00, b'{', b' ', b'}'],
            headers: vec![("stripe-signature".into(), b"t=1,v1=ab".to_vec())],
            provider_timestamp: Some(1_735_689_600),
            received_at_ms: 1_735_689_600_123,
            key_id: 1,
        }
    }

    #[test]
    fn round_trips_non_utf8_body() {
        let ev = sample();
        let bytes = ev.encode();
        assert_eq!(&bytes[..2], &MAGIC);
        assert_eq!(WebhookEvent::decode(&bytes).unwrap(), ev);
        assert_eq!(ev.header("Stripe-Signature"), Some(&b"t=1,v1=ab"[..]));
    }

    #[test]
    fn round_trips_without_timestamp() {
        let ev = WebhookEvent {
            provider_timestamp: None,
            headers: vec![],
            ..sample()
        };
        assert_eq!(WebhookEvent::decode(&ev.encode()).unwrap(), ev);
    }

    /// The record apache-avro (the reference implementation) writes for `ev`.
    fn reference_encode(ev: &WebhookEvent) -> Vec<u8> {
        use apache_avro::types::Value;
        let schema = apache_avro::Schema::parse_str(SCHEMA_JSON).unwrap();
        let headers = ev
            .headers
            .iter()
            .map(|(n, v)| {
                Value::Record(vec![
                    ("name".into(), Value::String(n.clone())),
                    ("value".into(), Value::Bytes(v.clone())),
                ])
            })
            .collect();
        let ts = match ev.provider_timestamp {
            Some(t) => Value::Union(1, Box::new(Value::Long(t))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let record = Value::Record(vec![
            ("event_id".into(), Value::String(ev.event_id.clone())),
            ("source".into(), Value::String(ev.source.clone())),
            ("scheme".into(), Value::String(ev.scheme.clone())),
            ("event_type".into(), Value::String(ev.event_type.clone())),
            ("body".into(), Value::Bytes(ev.body.clone())),
            ("headers".into(), Value::Array(headers)),
            ("provider_timestamp".into(), ts),
            ("received_at_ms".into(), Value::Long(ev.received_at_ms)),
            ("key_id".into(), Value::Int(ev.key_id)),
        ]);
        let fingerprint = schema.fingerprint::<apache_avro::rabin::Rabin>().bytes;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&fingerprint);
        out.extend(apache_avro::to_avro_datum(&schema, record).unwrap());
        out
    }

    #[test]
    fn matches_the_reference_implementation_byte_for_byte() {
        let long_body = vec![b'x'; 5000];
        for ev in [
            sample(),
            WebhookEvent {
                provider_timestamp: None,
                headers: vec![],
                event_type: String::new(),
                ..sample()
            },
            WebhookEvent {
                body: long_body,
                received_at_ms: i64::MIN,
                key_id: i32::MAX,
                headers: vec![("a".into(), vec![]), ("ünïcode".into(), vec![0, 1, 2])],
                ..sample()
            },
        ] {
            let reference = reference_encode(&ev);
            assert_eq!(ev.encode(), reference);
            assert_eq!(WebhookEvent::decode(&reference).unwrap(), ev);
        }
    }

    #[test]
    fn a_view_decodes_like_the_owned_event() {
        let ev = sample();
        let bytes = ev.encode();
        let view = WebhookEvent::decode_view(&bytes).unwrap();
        assert_eq!(view, ev.view());
        assert_eq!(view, WebhookEvent::decode(&bytes).unwrap().view());
        assert_eq!(view.body, ev.body.as_slice());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(WebhookEvent::decode_view(&trailing).is_err());
        assert!(matches!(
            WebhookEvent::decode_view(b"garbage!!!!!"),
            Err(DecodeError::BadMagic)
        ));
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(matches!(
            WebhookEvent::decode(&bytes),
            Err(DecodeError::Datum(_))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            WebhookEvent::decode(b"garbage!!!!!"),
            Err(DecodeError::BadMagic)
        ));
        let mut bytes = sample().encode();
        bytes[5] ^= 0xff;
        assert!(matches!(
            WebhookEvent::decode(&bytes),
            Err(DecodeError::UnknownSchema)
        ));
        let bytes = sample().encode();
        assert!(WebhookEvent::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
