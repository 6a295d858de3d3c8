//! The chaos group: the faults an adversarial test run found, each asserting
//! the documented behaviour. Run alone with `cargo test -p switchboard --test
//! chaos` (it is also part of `cargo test --workspace`).

#[path = "../common/mod.rs"]
mod common;

mod fencing;
