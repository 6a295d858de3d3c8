//! Chaos tests: races and faults that need many iterations or odd timing
//! to show up. One module per subject.

mod reply_order;
