//! The chaos group: the faults an adversarial test run found, each asserting
//! the documented behaviour against the real `switchboard` binary — stalled
//! and cut-off cluster nodes, slow, silent and too many control API peers.
//! Each module is one group of faults. Run alone with `cargo test -p
//! switchboard --test chaos` (it is also part of `cargo test --workspace`).

#[path = "../common/mod.rs"]
mod common;

mod control_listener;
mod fencing;
