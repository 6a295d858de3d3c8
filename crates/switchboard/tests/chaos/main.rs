//! Chaos tests of the real `switchboard` binary: slow, silent, broken and
//! too many peers. Each module is one group of faults.

#[path = "../common/mod.rs"]
mod common;

mod control_listener;
