//! End-to-end tests: one test binary, one module per scenario.

mod delivery;
mod foundation;
mod ingest;
mod observability;
mod processor;
mod projection;
mod rebuild;
mod scale;
