//! Every byte that crosses the kernel boundary: map names and sizes, keys, values and
//! counters, shared by `havip-ebpf` (kernel) and `havip-user` (controller, CLI) so the two
//! sides cannot drift. All types are `#[repr(C)]` with explicit padding and a compile-time
//! size check; the `user` feature adds `aya::Pod` so userspace can read and write them.
#![no_std]

pub mod classes;
pub mod csum;
pub mod fence;
pub mod maps;
pub mod names;
pub mod types;
pub mod versioned;

pub use classes::*;
pub use fence::*;
pub use types::*;
pub use versioned::*;
