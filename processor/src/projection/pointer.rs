//! JSON pointers (RFC 6901) into event bodies: resolving one, and parsing a
//! body into only the parts that the projections' pointers reach.
//!
//! Rules read a handful of values from bodies of a kilobyte or more. Building
//! the whole `Value` tree allocated every key and string of the body, and was
//! the largest single cost of a rebuild; [`Paths::parse`] still checks the
//! whole body is JSON but keeps only what a pointer can reach, so
//! [`lookup`] on its result answers exactly as on the full document.

use std::fmt;

use foldhash::HashMap;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Resolves a JSON pointer like `Value::pointer`, without its two string
/// replacements per token: tokens without `~` (nearly all) are compared in
/// place, so a lookup allocates nothing.
pub fn lookup<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        return Some(doc);
    }
    let mut at = doc;
    for raw in pointer.strip_prefix('/')?.split('/') {
        let token = unescape(raw);
        at = match at {
            Value::Object(map) => map.get(token.as_ref())?,
            Value::Array(items) => items.get(array_index(&token)?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// A pointer token with `~1` and `~0` decoded.
fn unescape(raw: &str) -> std::borrow::Cow<'_, str> {
    if raw.as_bytes().contains(&b'~') {
        raw.replace("~1", "/").replace("~0", "~").into()
    } else {
        raw.into()
    }
}

/// A token as an array index, as `Value::pointer` reads it (no sign, no
/// leading zero).
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

/// A set of JSON pointers as a tree of tokens.
#[derive(Debug, Default)]
pub struct Paths {
    /// A pointer ends here: the whole value is kept.
    whole: bool,
    /// Decoded tokens below here: object keys, or array indices as text.
    keys: HashMap<String, Paths>,
}

impl Paths {
    /// Adds a pointer (ignored when it does not start with `/` and is not
    /// empty: such a pointer resolves to nothing).
    pub fn add(&mut self, pointer: &str) {
        if pointer.is_empty() {
            self.whole = true;
            return;
        }
        let Some(rest) = pointer.strip_prefix('/') else {
            return;
        };
        let mut at = self;
        for raw in rest.split('/') {
            at = at.keys.entry(unescape(raw).into_owned()).or_default();
        }
        at.whole = true;
    }

    /// Parses `body` keeping only what the pointers reach; None when the
    /// body is not JSON (UTF-8 text holding one JSON value).
    pub fn parse(&self, body: &[u8]) -> Option<Value> {
        let text = std::str::from_utf8(body).ok()?;
        let mut de = serde_json::Deserializer::from_str(text);
        let value = Pruned(self).deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(value)
    }
}

/// Deserializes one value keeping only the parts its [`Paths`] reach.
/// Scalars nobody points at become `null`, array elements keep their
/// positions, so lookups resolve as on the full document.
struct Pruned<'p>(&'p Paths);

impl<'de> DeserializeSeed<'de> for Pruned<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.0.whole {
            Value::deserialize(d)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Pruned<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_str<E>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(Key(self.0))? {
            match key {
                Some((name, below)) => {
                    let value = map.next_value_seed(Pruned(below))?;
                    out.insert(name, value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            // Index `i` is reached by the token `i` (never `01` or `+1`).
            let below = match self.0.keys.is_empty() {
                true => None,
                false => self.0.keys.get(&out.len().to_string()),
            };
            let next = match below {
                Some(below) => seq.next_element_seed(Pruned(below))?,
                None => seq.next_element::<IgnoredAny>()?.map(|_| Value::Null),
            };
            match next {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }
}

/// An object key: the key and the paths below it when a pointer goes
/// there, else None (read without allocating).
struct Key<'p>(&'p Paths);

impl<'de, 'p> DeserializeSeed<'de> for Key<'p> {
    type Value = Option<(String, &'p Paths)>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'p> Visitor<'de> for Key<'p> {
    type Value = Option<(String, &'p Paths)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.keys.get(key).map(|below| (key.to_owned(), below)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"a":{"b":[10,{"c/d":1,"e~f":2,"":3}]},"0":4,"n":12345678901234567890123,
        "s":"x\"y\u00e9","skip":{"deep":[1,2,{"z":null}]},"t":true,"dup":1,"dup":2,"arr":[[1],[2,3]]}"#;

    const POINTERS: [&str; 22] = [
        "",
        "/a",
        "/a/b",
        "/a/b/0",
        "/a/b/1/c~1d",
        "/a/b/1/e~0f",
        "/a/b/1/",
        "/0",
        "/n",
        "/a/b/01",
        "/a/b/+1",
        "/a/b/2",
        "/a/x",
        "a",
        "/a/b/-",
        "/0/x",
        "/s",
        "/t",
        "/dup",
        "/arr/1/0",
        "/s/0",
        "/skip/deep/2/z",
    ];

    #[test]
    fn lookup_agrees_with_value_pointer() {
        let doc: Value = serde_json::from_str(DOC).unwrap();
        for p in POINTERS {
            assert_eq!(lookup(&doc, p), doc.pointer(p), "pointer {p:?}");
        }
    }

    #[test]
    fn a_pruned_document_answers_its_pointers_like_the_full_one() {
        let full: Value = serde_json::from_str(DOC).unwrap();
        // Each pointer alone, then all but the whole-document one together.
        for p in POINTERS {
            let mut paths = Paths::default();
            paths.add(p);
            let pruned = paths.parse(DOC.as_bytes()).unwrap();
            assert_eq!(lookup(&pruned, p), lookup(&full, p), "pointer {p:?}");
        }
        let mut paths = Paths::default();
        for p in POINTERS.iter().filter(|p| !p.is_empty()) {
            paths.add(p);
        }
        let pruned = paths.parse(DOC.as_bytes()).unwrap();
        for p in POINTERS.iter().filter(|p| !p.is_empty()) {
            assert_eq!(lookup(&pruned, p), lookup(&full, p), "pointer {p:?}");
        }
    }

    #[test]
    fn only_what_is_pointed_at_is_kept() {
        let mut paths = Paths::default();
        paths.add("/a/b/1/e~0f");
        paths.add("/n");
        let pruned = paths.parse(DOC.as_bytes()).unwrap();
        assert_eq!(
            pruned,
            serde_json::json!({"a": {"b": [null, {"e~f": 2}]}, "n": 12345678901234567890123u128})
        );
    }

    #[test]
    fn the_whole_body_must_still_be_json() {
        let mut paths = Paths::default();
        paths.add("/id");
        for bad in [
            &b"{\"id\":1,"[..],
            b"{\"id\":1} x",
            b"{\"id\":1,\"other\":[1,}",
            b"{\"id\":1,\"other\":\"\xff\"}",
            b"",
        ] {
            assert_eq!(paths.parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
            assert!(serde_json::from_slice::<Value>(bad).is_err());
        }
        assert_eq!(
            paths.parse(b" {\"id\":\"x\",\"other\":[1,{}]} "),
            Some(serde_json::json!({"id": "x"}))
        );
        assert_eq!(paths.parse(b"[1,2]"), Some(serde_json::json!([null, null])));
    }
}
