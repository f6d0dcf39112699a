//! The merge rules of a projection entity, applied in memory: last writer
//! wins by clock for `set` fields, a status only moves forward, `sum` and
//! `count` add up. The store reads an entity once per batch, folds every
//! new event of the batch into it here, and writes the result back once.
//!
//! Entity hash layout: the fields (JSON text), `~c:<field>` clocks,
//! `~r:<field>` status ranks, `~updated` (newest clock) and `~rev` (bumped
//! by every write; the store's compare-and-set token).

use std::collections::{BTreeSet, HashMap};

use super::spec::Op;

/// An entity's stored hash.
pub type Fields = HashMap<String, String>;

/// Name of the revision field.
pub const REV: &str = "~rev";

/// Applies one event's operations at `clock` (see `store::clock`) and notes
/// every field it wrote in `changed`.
pub fn apply(fields: &mut Fields, changed: &mut BTreeSet<String>, ops: &[Op], clock: &str) {
    // `~c:<f>` / `~r:<f>` names are built in one reused buffer, and a field
    // that already exists is overwritten in place: this runs for every
    // event of every batch, and allocations were most of its cost.
    let (mut c, mut rk) = (String::new(), String::new());
    for op in ops {
        match op {
            Op::Set { f, v } => {
                meta_name(&mut c, "~c:", f);
                if newer(fields, &c, clock) {
                    put(fields, changed, f, v);
                    put(fields, changed, &c, clock);
                }
            }
            Op::Status { f, v, r } => {
                meta_name(&mut c, "~c:", f);
                meta_name(&mut rk, "~r:", f);
                let rank = *r as i64;
                let cur_rank = fields
                    .get(&rk)
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(-1);
                if rank > cur_rank || (rank == cur_rank && newer(fields, &c, clock)) {
                    put(fields, changed, f, v);
                    put(fields, changed, &rk, &rank.to_string());
                    put(fields, changed, &c, clock);
                }
            }
            Op::Sum { f, v } => {
                let total = number(fields.get(f)) + v.parse::<f64>().unwrap_or(0.0);
                put(fields, changed, f, &format_number(total));
            }
            Op::Count { f } => {
                let n = fields
                    .get(f)
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0);
                put(fields, changed, f, &(n + 1).to_string());
            }
        }
    }
    if newer(fields, "~updated", clock) {
        put(fields, changed, "~updated", clock);
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
fn put(fields: &mut Fields, changed: &mut BTreeSet<String>, field: &str, value: &str) {
    match fields.get_mut(field) {
        Some(slot) => {
            slot.clear();
            slot.push_str(value);
        }
        None => {
            fields.insert(field.to_owned(), value.to_owned());
        }
    }
    if !changed.contains(field) {
        changed.insert(field.to_owned());
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
        let mut fields = Fields::new();
        let mut changed = BTreeSet::new();
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
        let mut fields = Fields::new();
        let mut changed = BTreeSet::new();
        apply(&mut fields, &mut changed, &[set("a", "1")], "5|x");
        let mut changed2 = BTreeSet::new();
        apply(&mut fields, &mut changed2, &[set("a", "2")], "4|y");
        assert_eq!(
            changed.into_iter().collect::<Vec<_>>(),
            ["a", "~c:a", "~updated"]
        );
        assert!(changed2.is_empty(), "an older write changes nothing");
    }
}
