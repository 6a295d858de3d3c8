//! The chaos group: the faults an adversarial test run found, each asserting
//! the documented behaviour — stalled and cut-off cluster nodes, running out
//! of file descriptors, slow, silent and too many control API peers, and
//! origin replies racing control API pushes. Each module is one group of
//! faults. Run alone with `cargo test -p switchboard --test chaos` (it is also
//! part of `cargo test --workspace`).

#[path = "../common/mod.rs"]
mod common;

mod control_listener;
mod fds;
mod fencing;
mod reply_order;
