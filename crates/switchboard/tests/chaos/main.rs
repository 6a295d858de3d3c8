//! Chaos tests of the real `switchboard` binary: the node under resource
//! exhaustion and faults. Each module is one kind of fault.

#[path = "../common/mod.rs"]
mod common;

mod fds;
