//! Everything that touches the kernel. Nothing here decides anything: the node layer says
//! what to do, these modules do it.

pub mod addr_probe;
pub mod announce;
pub mod bpf_read;
pub mod classes;
pub mod clock;
pub mod dataplane;
pub mod ingress_hook;
pub mod map_layout;
pub mod netlink;
pub mod netns;
pub mod pins;
pub mod plan;
pub mod probe_socket;
pub mod qdisc;
pub mod versioned;
