//! Projections: agent state as a pure function of the raw event log.
//!
//! - [`spec`]: the `[[projection]]` config and the mapping from an event to
//!   an [`spec::Update`] (pure, unit-tested);
//! - [`pointer`](mod@pointer): JSON pointers into event bodies, and parsing only what
//!   they reach;
//! - [`fold`]: the merge rules, applied to an entity in memory (pure);
//! - [`store`]: the Redis side: versions, read → fold → compare-and-set
//!   (`lua/commit.lua`), reads.
//!
//! Every update is order-insensitive: fields are last-writer-wins by
//! `(event time, event id)`, a status only moves forward by precedence, and
//! `sum`/`count` aggregates are commutative. Together with the per-version
//! idempotency markers written in the same atomic step, the same set of events in any
//! order, with any duplicates, gives the same state.

pub mod fold;
pub mod pointer;
pub mod spec;
pub mod store;
