//! Which hook havip's ingress program runs on, per NIC: native XDP, generic XDP, or TC.
//! A pure decision, table-tested; `Dataplane::attach` carries it out.
//!
//! Why not XDP everywhere: measured through a veth pair (`cargo xtask bench`, section
//! `veth`), native XDP costs about half the throughput of the same path without a program
//! (veth then builds every frame for XDP and loses its segmentation offload), and generic
//! XDP copies every large packet into a linear buffer first. A TC ingress program sees the
//! skb as it is and costs a few percent. On a NIC with a driver (on a bus), native XDP runs
//! before any skb exists and is the fastest hook there is.
//!
//! What TC cannot do: redirect into a class's CPU queue (the cpumap takes XDP frames
//! only). Where classes have CPU queues, a virtual NIC gets native XDP as any NIC does:
//! generic XDP could redirect, but a generic redirect drops the XDP metadata that tells
//! the queue's CPU the frame's class (the kernel keeps metadata only for XDP_PASS), and
//! the kernel accounts a generic cpumap enqueue differently. Generic XDP is the fallback
//! where the driver refuses native (veth above a peer MTU of about 3.5 KiB), with those
//! per-class queue counts missing. The choice and its reason are logged and shown by
//! `havip stats`.

use havip_common::{HookReason, IngressHook};

use crate::config::XdpModeSetting;

/// What the decision needs to know about a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicKind {
    /// The rtnetlink kind of a virtual device (`veth`, `bridge`, `vlan`, `macvlan`, ...);
    /// `None` for a NIC with a driver of its own (a bus device: PCI, virtio, ...).
    pub virtual_kind: Option<String>,
}

/// The hook to try first and, if the kernel refuses it, the one to fall back on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub first: (IngressHook, HookReason),
    pub fallback: Option<(IngressHook, HookReason)>,
}

/// The hook for a NIC of `kind`, under setting `mode`, with or without classes that have
/// CPU queues (`cpu_queues`).
pub fn choose(mode: XdpModeSetting, kind: &NicKind, cpu_queues: bool) -> Choice {
    use HookReason as R;
    use IngressHook as H;
    let configured = |h| Choice { first: (h, R::Configured), fallback: None };
    match mode {
        XdpModeSetting::Native => configured(H::XdpNative),
        XdpModeSetting::Generic => configured(H::XdpGeneric),
        XdpModeSetting::Tc => configured(H::Tc),
        XdpModeSetting::Auto => {
            // Where native XDP is out, the faster of the other two unless queues need XDP.
            let without_native = if cpu_queues { H::XdpGeneric } else { H::Tc };
            match kind.virtual_kind {
                None => Choice { first: (H::XdpNative, R::DriverNic), fallback: Some((without_native, R::NativeRefused)) },
                Some(_) if cpu_queues => Choice { first: (H::XdpNative, R::VirtualNicCpuQueues), fallback: Some((H::XdpGeneric, R::NativeRefused)) },
                Some(_) => Choice { first: (H::Tc, R::VirtualNic), fallback: None },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HookReason as R;
    use IngressHook as H;

    fn kind(k: Option<&str>) -> NicKind {
        NicKind { virtual_kind: k.map(str::to_string) }
    }

    #[test]
    fn each_setting_nic_kind_and_queue_case_gets_its_hook() {
        let cases: &[(XdpModeSetting, Option<&str>, bool, Choice)] = &[
            // auto: native on a driver NIC, falling back to TC (or generic XDP for queues)
            (XdpModeSetting::Auto, None, false, Choice { first: (H::XdpNative, R::DriverNic), fallback: Some((H::Tc, R::NativeRefused)) }),
            (XdpModeSetting::Auto, None, true, Choice { first: (H::XdpNative, R::DriverNic), fallback: Some((H::XdpGeneric, R::NativeRefused)) }),
            // auto: TC on virtual NICs, native XDP (then generic) where CPU queues need XDP
            (XdpModeSetting::Auto, Some("veth"), false, Choice { first: (H::Tc, R::VirtualNic), fallback: None }),
            (XdpModeSetting::Auto, Some("vlan"), false, Choice { first: (H::Tc, R::VirtualNic), fallback: None }),
            (XdpModeSetting::Auto, Some("veth"), true, Choice { first: (H::XdpNative, R::VirtualNicCpuQueues), fallback: Some((H::XdpGeneric, R::NativeRefused)) }),
            // explicit settings: exactly that hook, no fallback, whatever the NIC
            (XdpModeSetting::Native, Some("veth"), false, Choice { first: (H::XdpNative, R::Configured), fallback: None }),
            (XdpModeSetting::Generic, None, false, Choice { first: (H::XdpGeneric, R::Configured), fallback: None }),
            (XdpModeSetting::Tc, None, false, Choice { first: (H::Tc, R::Configured), fallback: None }),
        ];
        for (mode, k, queues, want) in cases {
            assert_eq!(choose(*mode, &kind(*k), *queues), *want, "{mode:?} on {k:?}, queues {queues}");
        }
    }
}
