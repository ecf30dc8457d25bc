//! Reading what runs, without changing it: the kernel's counters and the controller's
//! state as `havip stats` tables, Prometheus metrics and the `havip top` view.

pub mod metrics;
pub mod stats;
pub mod top;
