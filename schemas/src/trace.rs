//! W3C Trace Context (`traceparent`) handling: continue an incoming trace or
//! start one, so a record on Kafka can be followed back to its HTTP request.

use rand::RngCore;

/// A parsed `traceparent` (version 00).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, lower-case hex.
    pub trace_id: String,
    /// 8-byte parent span id, lower-case hex.
    pub span_id: String,
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header; `None` when it is malformed or all-zero,
    /// in which case the W3C spec says to start a new trace.
    pub fn parse(value: &str) -> Option<Self> {
        let parts: Vec<&str> = value.trim().split('-').collect();
        if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" {
            return None;
        }
        let (trace_id, span_id, flags) = (parts[1], parts[2], parts[3]);
        let is_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(trace_id, 32) || !is_hex(span_id, 16) || !is_hex(flags, 2) {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(Self {
            trace_id: trace_id.to_owned(),
            span_id: span_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// Starts a new sampled trace.
    pub fn new_root() -> Self {
        let mut rng = rand::thread_rng();
        Self {
            trace_id: format!(
                "{:032x}",
                rng.next_u64() as u128 | ((rng.next_u64() as u128) << 64) | 1
            ),
            span_id: new_span_id(),
            flags: 1,
        }
    }

    /// A child of this context: same trace, new span id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            span_id: new_span_id(),
            flags: self.flags,
        }
    }

    /// The header value.
    pub fn header_value(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

fn new_span_id() -> String {
    format!("{:016x}", rand::thread_rng().next_u64() | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(v).unwrap();
        assert_eq!(tp.header_value(), v);
        let child = tp.child();
        assert_eq!(child.trace_id, tp.trace_id);
        assert_ne!(child.span_id, tp.span_id);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        let root = TraceParent::new_root();
        assert!(TraceParent::parse(&root.header_value()).is_some());
    }
}
