//! The NICs havipd has attached, as the binder and the kernel maps know them. A NIC is
//! found by name in the config and by ifindex in the maps; a NIC deleted and created
//! again keeps its name but gets a new ifindex (and maybe MAC), so both are refreshed
//! from every link event, never kept from the first sight.

use std::collections::BTreeMap;

/// One attached NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// Slot in NIC_STATS (kept across restarts and re-creations of the NIC).
    pub index: u32,
}

#[derive(Debug, Clone, Default)]
pub struct NicTable {
    by_name: BTreeMap<String, Nic>,
}

impl NicTable {
    pub fn get(&self, name: &str) -> Option<&Nic> {
        self.by_name.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn insert(&mut self, name: &str, nic: Nic) {
        self.by_name.insert(name.to_string(), nic);
    }

    pub fn remove(&mut self, name: &str) -> Option<Nic> {
        self.by_name.remove(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The NIC with `ifindex` now. An ifindex of a NIC that was deleted matches nothing,
    /// even if a NIC of the same name exists again.
    pub fn name_of(&self, ifindex: u32) -> Option<&str> {
        if ifindex == 0 {
            return None;
        }
        self.by_name.iter().find(|(_, n)| n.ifindex == ifindex).map(|(k, _)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recreated_nic_is_found_by_its_new_ifindex_only() {
        let mut t = NicTable::default();
        t.insert("a0", Nic { ifindex: 7, mac: [2, 0, 0, 0, 0, 7], index: 0 });
        assert_eq!(t.name_of(7), Some("a0"));
        t.insert("a0", Nic { ifindex: 12, mac: [2, 0, 0, 0, 0, 12], index: 0 });
        assert_eq!(t.name_of(7), None, "the dead ifindex names no NIC");
        assert_eq!(t.name_of(12), Some("a0"));
        assert_eq!(t.name_of(0), None);
    }
}
