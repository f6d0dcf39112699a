//! Which entities later batches of this process will publish, so that an
//! earlier batch's changelog check can leave them to those batches.

use std::sync::Mutex;

use foldhash::HashMap;

use crate::projection::store::EntityState;

/// An entity: (projection, key).
pub(super) type EntityId = (String, String);

/// For each entity, how many batches of this process have planned an
/// update to it and not yet published its state: projection → key → count.
/// Nested by projection so lookups borrow the names (this runs for every
/// entity of every batch three times).
#[derive(Default)]
pub(super) struct Unpublished(Mutex<HashMap<String, HashMap<String, usize>>>);

impl Unpublished {
    /// Registers a batch's entities (before it is applied).
    pub(super) fn add(&self, entities: &[EntityId]) {
        let mut map = self.0.lock().expect("lock");
        for (projection, key) in entities {
            let keys = match map.get_mut(projection) {
                Some(keys) => keys,
                None => map.entry(projection.clone()).or_default(),
            };
            match keys.get_mut(key) {
                Some(n) => *n += 1,
                None => {
                    keys.insert(key.clone(), 1);
                }
            }
        }
    }

    /// Unregisters a batch's entities (once it is published).
    pub(super) fn remove(&self, entities: &[EntityId]) {
        let mut map = self.0.lock().expect("lock");
        for (projection, key) in entities {
            let Some(keys) = map.get_mut(projection) else {
                continue;
            };
            if let Some(n) = keys.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    keys.remove(key);
                }
            }
        }
        map.retain(|_, keys| !keys.is_empty());
    }

    /// True when a later batch of this process will publish the entity.
    pub(super) fn later_batch_has(&self, s: &EntityState) -> bool {
        let map = self.0.lock().expect("lock");
        map.get(&s.projection)
            .and_then(|keys| keys.get(&s.key))
            .is_some_and(|&n| n > 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: &str, k: &str) -> EntityId {
        (p.into(), k.into())
    }

    fn state(p: &str, k: &str) -> EntityState {
        EntityState {
            projection: p.into(),
            key: k.into(),
            version: 1,
            rev: 1,
            json: Vec::new(),
        }
    }

    #[test]
    fn an_entity_is_left_to_a_later_batch_only_while_one_holds_it() {
        let u = Unpublished::default();
        let first = vec![id("orders", "A"), id("orders", "B")];
        let second = vec![id("orders", "B"), id("customers", "A")];
        u.add(&first);
        // Only the batch itself holds them: it must re-check them itself.
        assert!(!u.later_batch_has(&state("orders", "A")));
        assert!(!u.later_batch_has(&state("orders", "B")));
        u.add(&second);
        assert!(u.later_batch_has(&state("orders", "B")));
        assert!(!u.later_batch_has(&state("orders", "A")));
        assert!(
            !u.later_batch_has(&state("customers", "B")),
            "by projection and key"
        );
        u.remove(&first);
        // The second batch is now the last holder of B.
        assert!(!u.later_batch_has(&state("orders", "B")));
        u.remove(&second);
        assert!(u.0.lock().unwrap().is_empty());
    }
}
