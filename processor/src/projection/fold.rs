//! The merge rules of a projection entity, applied in memory: last writer
//! wins by clock for `set` fields, a status only moves forward, `sum` and
//! `count` add up. The store reads an entity once per batch, folds every
//! new event of the batch into it here, and writes the result back once.
//!
//! Entity hash layout: the fields (JSON text), `~c:<field>` clocks (only
//! for fields last written by an event older than `~updated`; see
//! [`apply`]), `~r:<field>` status ranks, `~updated` (newest clock) and
//! `~rev` (bumped by every write; the store's compare-and-set token).

use foldhash::HashMap;

use super::spec::Op;

/// An entity's stored hash.
pub type Fields = HashMap<String, String>;

/// The names of the fields a fold wrote, each once, in the order first
/// written: an entity has a handful, so a scan beats a tree.
pub type Changed = Vec<String>;

/// Name of the revision field.
pub const REV: &str = "~rev";

/// Name of the newest-clock field.
const UPDATED: &str = "~updated";

/// Applies one event's operations at `clock` (see `store::clock`) and notes
/// every field it wrote in `changed`.
///
/// A field's clock is `~c:<field>` when that is present, else `~updated`:
/// the fields the newest event wrote carry no clock of their own. Before
/// `~updated` moves on, the fields that relied on it and that this event
/// does not write get their clock written out. Most entities are written by
/// one event per batch, and this halves the fields each write sends.
pub fn apply(fields: &mut Fields, changed: &mut Changed, ops: &[Op], clock: &str) {
    // `~c:<f>` / `~r:<f>` names are built in reused buffers, and a field
    // that already exists is overwritten in place: this runs for every
    // event of every batch, and allocations were most of its cost.
    let (mut c, mut rk) = (String::new(), String::new());
    let newest = newer(fields, UPDATED, clock);
    let mut written: Vec<&str> = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Set { f, v } => {
                if clock_is_newer(fields, f, clock, &mut c) {
                    put(fields, changed, f, v);
                    stamp(fields, changed, &c, clock, newest);
                    written.push(f);
                }
            }
            Op::Status { f, v, r } => {
                meta_name(&mut rk, "~r:", f);
                let rank = *r as i64;
                let cur_rank = fields
                    .get(&rk)
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(-1);
                let newer_clock = clock_is_newer(fields, f, clock, &mut c);
                if rank > cur_rank || (rank == cur_rank && newer_clock) {
                    put(fields, changed, f, v);
                    put(fields, changed, &rk, &rank.to_string());
                    stamp(fields, changed, &c, clock, newest);
                    written.push(f);
                }
            }
            Op::Sum { f, v } => {
                let total = number(fields.get(f)) + v.parse::<f64>().unwrap_or(0.0);
                put(fields, changed, f, &format_number(total));
                written.push(f);
            }
            Op::Count { f } => {
                let n = fields
                    .get(f)
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0);
                put(fields, changed, f, &(n + 1).to_string());
                written.push(f);
            }
        }
    }
    if newest {
        if let Some(previous) = fields.get(UPDATED).cloned() {
            let relied: Vec<String> = fields
                .keys()
                .filter(|f| !f.starts_with('~') && !written.contains(&f.as_str()))
                .filter(|f| !fields.contains_key(&format!("~c:{f}")))
                .cloned()
                .collect();
            for f in relied {
                put(fields, changed, &format!("~c:{f}"), &previous);
            }
        }
        put(fields, changed, UPDATED, clock);
    }
}

/// True when `clock` is later than the clock of `field` (or it has none);
/// leaves the name `~c:<field>` in `c`.
fn clock_is_newer(fields: &Fields, field: &str, clock: &str, c: &mut String) -> bool {
    meta_name(c, "~c:", field);
    let current = match fields.get(c.as_str()) {
        Some(own) => Some(own),
        None if fields.contains_key(field) => fields.get(UPDATED),
        None => None,
    };
    current.is_none_or(|cur| clock > cur.as_str())
}

/// Records that a field was written at `clock`: nothing when the event is
/// the entity's newest and the field has no clock of its own (it follows
/// `~updated`), else its own clock `c`.
fn stamp(fields: &mut Fields, changed: &mut Changed, c: &str, clock: &str, newest: bool) {
    if !newest || fields.contains_key(c) {
        put(fields, changed, c, clock);
    }
}

/// Sets `buf` to `<prefix><field>`.
fn meta_name(buf: &mut String, prefix: &str, field: &str) {
    buf.clear();
    buf.push_str(prefix);
    buf.push_str(field);
}

/// True when `clock` is later than the clock stored in `field` (or none is).
fn newer(fields: &Fields, field: &str, clock: &str) -> bool {
    fields.get(field).is_none_or(|cur| clock > cur.as_str())
}

/// Writes `field = value` and notes the field as changed, reusing the
/// existing allocations when the field is already there.
fn put(fields: &mut Fields, changed: &mut Changed, field: &str, value: &str) {
    match fields.get_mut(field) {
        Some(slot) => {
            slot.clear();
            slot.push_str(value);
        }
        None => {
            fields.insert(field.to_owned(), value.to_owned());
        }
    }
    if !changed.iter().any(|c| c == field) {
        changed.push(field.to_owned());
    }
}

/// The entity's revision (0 when new).
pub fn rev(fields: &Fields) -> u64 {
    fields.get(REV).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn number(v: Option<&String>) -> f64 {
    v.and_then(|s| s.parse().ok()).unwrap_or(0.0)
}

/// Whole numbers without a fraction (`2000`, as JSON integers), others in
/// the shortest text that reads back to the same f64: a stored total is
/// exact, so adding one event at a time or a batch at once gives the same
/// bits.
fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(f: &str, v: &str) -> Op {
        Op::Set {
            f: f.into(),
            v: v.into(),
        }
    }

    fn status(v: &str, r: usize) -> Op {
        Op::Status {
            f: "status".into(),
            v: format!("\"{v}\""),
            r,
        }
    }

    fn run(events: &[(&str, Vec<Op>)]) -> Fields {
        let mut fields = Fields::default();
        let mut changed = Changed::new();
        for (clock, ops) in events {
            apply(&mut fields, &mut changed, ops, clock);
        }
        fields
    }

    #[test]
    fn last_writer_wins_by_clock_in_any_order() {
        let a = ("001|a", vec![set("carrier", "\"UPS\"")]);
        let b = ("002|b", vec![set("carrier", "\"FedEx\"")]);
        for order in [vec![a.clone(), b.clone()], vec![b, a]] {
            let f = run(&order);
            assert_eq!(f["carrier"], "\"FedEx\"");
            assert_eq!(f["~updated"], "002|b");
        }
    }

    #[test]
    fn status_only_moves_forward() {
        let f = run(&[
            ("003|c", vec![status("shipped", 2)]),
            ("009|d", vec![status("paid", 1)]),
        ]);
        assert_eq!(f["status"], "\"shipped\"");
        assert_eq!(f["~r:status"], "2");
        assert_eq!(f["~updated"], "009|d");
    }

    #[test]
    fn sums_and_counts_add_and_write_whole_numbers_as_integers() {
        let sum = |v: &str| Op::Sum {
            f: "total".into(),
            v: v.into(),
        };
        let count = Op::Count { f: "n".into() };
        let f = run(&[
            ("1|a", vec![sum("1999.5"), count.clone()]),
            ("2|b", vec![sum("0.5"), count]),
        ]);
        assert_eq!(f["total"], "2000");
        assert_eq!(f["n"], "2");
        let f = run(&[("1|a", vec![sum("0.1")]), ("2|b", vec![sum("0.2")])]);
        assert_eq!(f["total"], "0.30000000000000004");
        assert_eq!(f["total"].parse::<f64>().unwrap(), 0.1 + 0.2);
    }

    #[test]
    fn changed_lists_every_written_field() {
        let mut fields = Fields::default();
        let mut changed = Changed::new();
        apply(&mut fields, &mut changed, &[set("a", "1")], "5|x");
        let mut changed2 = Changed::new();
        apply(&mut fields, &mut changed2, &[set("a", "2")], "4|y");
        assert_eq!(
            changed,
            ["a", "~updated"],
            "the newest event's fields follow ~updated"
        );
        assert!(changed2.is_empty(), "an older write changes nothing");
    }

    /// Visible fields only (what readers and the changelog see).
    fn visible(f: &Fields) -> Vec<(String, String)> {
        let mut v: Vec<_> = f
            .iter()
            .filter(|(k, _)| !k.starts_with("~c:"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn implicit_clocks_give_the_same_state_in_every_order() {
        // Overlapping fields, a status and a count, at four clocks: every one
        // of the 24 orders must end in the same fields and ranks.
        let events = [
            ("1|a", vec![set("x", "1"), set("y", "1"), status("paid", 1)]),
            ("2|b", vec![set("y", "2"), Op::Count { f: "n".into() }]),
            ("3|c", vec![set("z", "3"), status("shipped", 2)]),
            ("4|d", vec![set("x", "4"), status("created", 0)]),
        ];
        let mut orders: Vec<Vec<usize>> = vec![vec![]];
        for _ in 0..events.len() {
            let mut longer = Vec::new();
            for o in &orders {
                for i in (0..events.len()).filter(|i| !o.contains(i)) {
                    longer.push([o.clone(), vec![i]].concat());
                }
            }
            orders = longer;
        }
        assert_eq!(orders.len(), 24);
        let expected = visible(&run(&events));
        assert_eq!(
            expected,
            [
                ("n", "1"),
                ("status", "\"shipped\""),
                ("x", "4"),
                ("y", "2"),
                ("z", "3"),
                ("~r:status", "2"),
                ("~updated", "4|d"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        for order in orders {
            let shuffled: Vec<_> = order.iter().map(|&i| events[i].clone()).collect();
            assert_eq!(visible(&run(&shuffled)), expected, "order {order:?}");
        }
    }

    #[test]
    fn a_field_keeps_its_clock_when_a_newer_event_skips_it() {
        let f = run(&[("1|a", vec![set("x", "1")]), ("2|b", vec![set("y", "2")])]);
        assert_eq!(f.get("~c:x").map(String::as_str), Some("1|a"));
        assert_eq!(f.get("~c:y"), None, "y follows ~updated");
        // An event between the two may now overwrite x but not y.
        let f = run(&[
            ("1|a", vec![set("x", "1")]),
            ("3|c", vec![set("y", "3")]),
            ("2|b", vec![set("x", "2"), set("y", "2")]),
        ]);
        assert_eq!((f["x"].as_str(), f["y"].as_str()), ("2", "3"));
        assert_eq!(f["~c:x"], "2|b");
    }
}
