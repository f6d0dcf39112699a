//! Subscriptions: who wants which events, where, signed with which secret.
//!
//! Stored in Redis (one hash per subscription plus an index set), the
//! source of truth for the subscription API and the cache of every
//! deliverer replica. Redis is the right home because subscriptions need
//! read-your-writes and atomic field updates (rotate a secret, disable on
//! 410, track failures) from any replica; run it with AOF persistence
//! (`appendonly yes`) — see docs/delivery.md.

use std::collections::HashMap;

use base64::Engine;
use rand::RngCore;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisError, Script};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

/// One subscription. `Debug` never shows the secrets.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// `sub_<hex>`.
    pub id: String,
    /// Exact event type, or `prefix.*`.
    pub event_type: String,
    /// Only events of this source (a `[[source]]` name); any when `None`.
    pub source: Option<String>,
    /// Where events are POSTed.
    pub callback_url: String,
    /// Free text.
    pub description: Option<String>,
    /// Creation time, Unix ms; events received earlier are not delivered.
    pub created_at_ms: i64,
    /// The current signing secret (`whsec_<base64>`).
    pub secret: SecretString,
    /// The previous secret and when it stops signing (Unix ms).
    pub previous_secret: Option<(SecretString, i64)>,
    /// When and why it was disabled.
    pub disabled: Option<(i64, String)>,
    /// Start of the current run of failed attempts.
    pub failing_since_ms: Option<i64>,
}

impl Subscription {
    /// True when an event of `source` and `event_type` is one this
    /// subscription wants.
    pub fn matches(&self, source: &str, event_type: &str) -> bool {
        self.source.as_deref().is_none_or(|s| s == source)
            && pattern_matches(&self.event_type, event_type)
    }

    /// Secrets that sign a delivery at `now_ms`: current first.
    pub fn signing_secrets(&self, now_ms: i64) -> Vec<&SecretString> {
        let mut out = vec![&self.secret];
        if let Some((prev, until)) = &self.previous_secret {
            if *until > now_ms {
                out.push(prev);
            }
        }
        out
    }

    /// The API view: everything but the secrets.
    pub fn public_json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "event_type": self.event_type,
            "source": self.source,
            "callback_url": self.callback_url,
            "description": self.description,
            "created_at": rfc3339(self.created_at_ms),
            "enabled": self.disabled.is_none(),
        });
        if let Some((at, reason)) = &self.disabled {
            v["disabled_at"] = json!(rfc3339(*at));
            v["disabled_reason"] = json!(reason);
        }
        if let Some((_, until)) = &self.previous_secret {
            v["previous_secret_expires_at"] = json!(rfc3339(*until));
        }
        v
    }

    fn from_hash(h: HashMap<String, String>) -> Option<Self> {
        let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        let previous_secret = match (h.get("previous_secret"), int("previous_secret_until_ms")) {
            (Some(s), Some(until)) => Some((SecretString::from(s.clone()), until)),
            _ => None,
        };
        let disabled = int("disabled_at_ms")
            .map(|at| (at, h.get("disabled_reason").cloned().unwrap_or_default()));
        Some(Self {
            id: h.get("id")?.clone(),
            event_type: h.get("event_type")?.clone(),
            source: h.get("source").cloned().filter(|s| !s.is_empty()),
            callback_url: h.get("callback_url")?.clone(),
            description: h.get("description").cloned().filter(|d| !d.is_empty()),
            created_at_ms: int("created_at_ms")?,
            secret: SecretString::from(h.get("secret")?.clone()),
            previous_secret,
            disabled,
            failing_since_ms: int("failing_since_ms"),
        })
    }
}

/// `order.shipped` matches itself; `order.*` matches `order.<anything>`.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix(".*") {
        Some(prefix) => event_type
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1),
        None => pattern == event_type,
    }
}

/// Checks an `event_type` pattern; the error says what is wrong.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.len() > 200 {
        return Err("event_type must be 1 to 200 characters".into());
    }
    let exact = pattern.strip_suffix(".*").unwrap_or(pattern);
    if exact.is_empty()
        || !exact
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c))
    {
        return Err(
            "event_type must be an exact type such as order.shipped or a prefix wildcard such as order.*"
                .into(),
        );
    }
    Ok(())
}

/// A new random signing secret, `whsec_` + base64 of 32 random bytes
/// (the Standard Webhooks format).
pub fn new_secret() -> SecretString {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    SecretString::from(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    ))
}

/// A new subscription id.
pub fn new_id() -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    format!("sub_{}", hex::encode(b))
}

/// Unix ms as RFC 3339 (UTC).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Sets a field when it is absent and the subscription still exists;
/// returns the field's value (0 when the subscription is gone).
const SET_NX_IF_EXISTS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
";

/// Sets `ARGV[1]` field/value pairs, then deletes the remaining fields, only
/// when the subscription still exists.
const UPDATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local pairs = tonumber(ARGV[1])
for i = 2, 1 + 2 * pairs, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 2 + 2 * pairs, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
return 1
";

/// Fields to set and to delete in one atomic update of a subscription.
#[derive(Debug, Default)]
pub struct Change {
    /// Field, value.
    pub set: Vec<(&'static str, String)>,
    /// Fields to delete.
    pub delete: Vec<&'static str>,
}

impl Change {
    /// Enabled again: no longer disabled, and its failing run starts anew.
    pub fn enable(&mut self) {
        self.delete
            .extend(["disabled_at_ms", "disabled_reason", "failing_since_ms"]);
    }

    /// Disabled at `now_ms` for `reason`.
    pub fn disable(&mut self, now_ms: i64, reason: &str) {
        self.set.push(("disabled_at_ms", now_ms.to_string()));
        self.set.push(("disabled_reason", reason.to_owned()));
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.delete.is_empty()
    }
}

/// Moves the current secret to `previous_secret` and installs a new one.
const ROTATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[1], 'secret')
redis.call('HSET', KEYS[1], 'previous_secret', old, 'previous_secret_until_ms', ARGV[2], 'secret', ARGV[1])
return 1
";

/// Redis access for subscriptions.
#[derive(Clone)]
pub struct SubscriptionStore {
    conn: ConnectionManager,
    prefix: String,
    set_nx_if_exists: Script,
    update: Script,
    rotate: Script,
}

impl SubscriptionStore {
    /// `prefix` is `redis.key_prefix`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: format!("{prefix}dlv:"),
            set_nx_if_exists: Script::new(SET_NX_IF_EXISTS),
            update: Script::new(UPDATE),
            rotate: Script::new(ROTATE),
        }
    }

    fn key(&self, id: &str) -> String {
        format!("{}sub:{id}", self.prefix)
    }

    fn index(&self) -> String {
        format!("{}subs", self.prefix)
    }

    /// Stores a new subscription.
    pub async fn create(&self, s: &Subscription) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let fields = [
            ("id", s.id.clone()),
            ("event_type", s.event_type.clone()),
            ("source", s.source.clone().unwrap_or_default()),
            ("callback_url", s.callback_url.clone()),
            ("description", s.description.clone().unwrap_or_default()),
            ("created_at_ms", s.created_at_ms.to_string()),
            ("secret", s.secret.expose_secret().to_owned()),
        ];
        redis::pipe()
            .atomic()
            .hset_multiple(self.key(&s.id), &fields)
            .ignore()
            .sadd(self.index(), &s.id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    }

    /// One subscription.
    pub async fn get(&self, id: &str) -> Result<Option<Subscription>, RedisError> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn.hgetall(self.key(id)).await?;
        Ok(Subscription::from_hash(h))
    }

    /// Every subscription, oldest first.
    pub async fn list(&self) -> Result<Vec<Subscription>, RedisError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.smembers(self.index()).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(self.key(id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        let mut subs: Vec<Subscription> = hashes
            .into_iter()
            .filter_map(Subscription::from_hash)
            .collect();
        subs.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(subs)
    }

    /// Deletes it; false when it did not exist.
    pub async fn delete(&self, id: &str) -> Result<bool, RedisError> {
        let mut conn = self.conn.clone();
        let (n, _): (i64, i64) = redis::pipe()
            .atomic()
            .del(self.key(id))
            .srem(self.index(), id)
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Installs `secret`; the old one signs until `previous_until_ms`.
    pub async fn rotate(
        &self,
        id: &str,
        secret: &SecretString,
        previous_until_ms: i64,
    ) -> Result<bool, RedisError> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .rotate
            .key(self.key(id))
            .arg(secret.expose_secret())
            .arg(previous_until_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Applies `change` atomically; false when it does not exist.
    pub async fn update(&self, id: &str, change: &Change) -> Result<bool, RedisError> {
        let mut conn = self.conn.clone();
        let mut call = self.update.key(self.key(id));
        call.arg(change.set.len());
        for (field, value) in &change.set {
            call.arg(*field).arg(value);
        }
        for field in &change.delete {
            call.arg(*field);
        }
        let n: i64 = call.invoke_async(&mut conn).await?;
        Ok(n == 1)
    }

    /// Disables it (no more attempts).
    pub async fn disable(&self, id: &str, now_ms: i64, reason: &str) -> Result<(), RedisError> {
        let mut change = Change::default();
        change.disable(now_ms, reason);
        self.update(id, &change).await.map(|_| ())
    }

    /// Records a failed attempt; returns the start of the failing run.
    pub async fn failed(&self, id: &str, now_ms: i64) -> Result<i64, RedisError> {
        let mut conn = self.conn.clone();
        let since: Option<i64> = self
            .set_nx_if_exists
            .key(self.key(id))
            .arg("failing_since_ms")
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(since.unwrap_or(now_ms))
    }

    /// Records a success: the endpoint is healthy again.
    pub async fn succeeded(&self, id: &str) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        conn.hdel(self.key(id), "failing_since_ms").await
    }
}

/// Each replica's in-memory copy of the subscriptions, refreshed from
/// Redis by the fan-out (before matching events newer than the copy) and
/// the dispatcher (every second).
#[derive(Default)]
pub struct SubscriptionCache {
    inner: std::sync::RwLock<(std::sync::Arc<Vec<Subscription>>, i64)>,
}

impl SubscriptionCache {
    /// The current copy.
    pub fn snapshot(&self) -> std::sync::Arc<Vec<Subscription>> {
        self.inner.read().expect("lock").0.clone()
    }

    /// When the copy was loaded (Unix ms; 0 = never).
    pub fn loaded_at_ms(&self) -> i64 {
        self.inner.read().expect("lock").1
    }

    /// Reloads from Redis.
    pub async fn refresh(&self, store: &SubscriptionStore) -> Result<(), RedisError> {
        let started = chrono::Utc::now().timestamp_millis();
        let subs = store.list().await?;
        *self.inner.write().expect("lock") = (std::sync::Arc::new(subs), started);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix_patterns() {
        assert!(pattern_matches("order.shipped", "order.shipped"));
        assert!(!pattern_matches("order.shipped", "order.shipped.late"));
        assert!(pattern_matches("order.*", "order.shipped"));
        assert!(pattern_matches("order.*", "order.shipped.late"));
        assert!(!pattern_matches("order.*", "order"));
        assert!(!pattern_matches("order.*", "order."));
        assert!(!pattern_matches("order.*", "orders.created"));
    }

    #[test]
    fn pattern_validation() {
        assert!(validate_pattern("customer.signed_up").is_ok());
        assert!(validate_pattern("order.*").is_ok());
        for bad in ["", "*", "order*", "order.*.x", "a b", ".*"] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_and_ids_are_random_and_never_debug_printed() {
        let a = new_secret();
        assert!(a.expose_secret().starts_with("whsec_"));
        assert_ne!(a.expose_secret(), new_secret().expose_secret());
        assert_ne!(new_id(), new_id());
        let s = Subscription {
            id: new_id(),
            event_type: "order.shipped".into(),
            source: None,
            callback_url: "https://example.com/hook".into(),
            description: None,
            created_at_ms: 0,
            secret: a.clone(),
            previous_secret: Some((new_secret(), 10)),
            disabled: None,
            failing_since_ms: None,
        };
        let printed = format!("{s:?} {}", s.public_json());
        assert!(!printed.contains(a.expose_secret()), "{printed}");
        assert_eq!(s.signing_secrets(5).len(), 2);
        assert_eq!(s.signing_secrets(10).len(), 1);
    }
}
