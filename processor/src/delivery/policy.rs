//! What a receiver's answer means and when to try again. Pure, so the
//! rules are unit-tested exactly:
//!
//! - 2xx: delivered;
//! - 410 Gone: the receiver unsubscribed, the subscription is disabled;
//! - 408, 429, 5xx, timeouts, connection errors: retried on the schedule
//!   (429/503 `Retry-After` honoured, up to a day), then dead-lettered;
//! - 3xx (redirects are not followed) and other 4xx: failed, not retried,
//!   dead-lettered at once.

use std::time::Duration;

/// The verdict on one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted by the receiver.
    Delivered,
    /// Try again later; `retry_after` is the receiver's wish.
    Retry {
        /// From the `Retry-After` header.
        retry_after: Option<Duration>,
    },
    /// Will never succeed: dead-letter now. The reason is a bounded label.
    Failed(&'static str),
    /// 410: disable the subscription.
    Gone,
}

/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Classifies an HTTP answer.
pub fn classify(status: u16, retry_after: Option<&str>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        408 | 429 | 500..=599 => Verdict::Retry {
            retry_after: retry_after.and_then(parse_retry_after),
        },
        300..=399 => Verdict::Failed("redirect"),
        _ => Verdict::Failed("rejected"),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date, capped at a day.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        let ms = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
        Duration::from_millis(ms.max(0) as u64)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// Delay before the next attempt after `attempts` failed ones, or None when
/// the schedule is exhausted. `jitter` in [0, 1) spreads retries by ±20 %
/// so a recovering endpoint is not hit by every retry at once.
pub fn next_delay(
    schedule_secs: &[u64],
    attempts: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Option<Duration> {
    let base = *schedule_secs.get(attempts.checked_sub(1)? as usize)?;
    let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    let delay = Duration::from_secs_f64(base as f64 * factor);
    Some(retry_after.map_or(delay, |r| r.max(delay)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_every_status_class() {
        assert_eq!(classify(200, None), Verdict::Delivered);
        assert_eq!(classify(204, None), Verdict::Delivered);
        assert_eq!(classify(410, None), Verdict::Gone);
        assert_eq!(classify(400, None), Verdict::Failed("rejected"));
        assert_eq!(classify(401, None), Verdict::Failed("rejected"));
        assert_eq!(classify(404, None), Verdict::Failed("rejected"));
        assert_eq!(classify(301, None), Verdict::Failed("redirect"));
        assert_eq!(classify(500, None), Verdict::Retry { retry_after: None });
        assert_eq!(classify(408, None), Verdict::Retry { retry_after: None });
        assert_eq!(
            classify(429, Some("7")),
            Verdict::Retry {
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn retry_after_dates_and_caps() {
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon"), None);
        let past = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert_eq!(parse_retry_after(past), Some(Duration::ZERO));
    }

    #[test]
    fn schedule_with_jitter_and_retry_after() {
        let s = [5, 300];
        assert_eq!(next_delay(&s, 0, None, 0.5), None);
        assert_eq!(next_delay(&s, 1, None, 0.5), Some(Duration::from_secs(5)));
        assert_eq!(next_delay(&s, 2, None, 0.0), Some(Duration::from_secs(240)));
        assert_eq!(next_delay(&s, 2, None, 1.0), Some(Duration::from_secs(360)));
        assert_eq!(next_delay(&s, 3, None, 0.5), None);
        assert_eq!(
            next_delay(&s, 1, Some(Duration::from_secs(60)), 0.5),
            Some(Duration::from_secs(60))
        );
    }
}
