//! Names as the kernel maps hold them (NIC and class names): NUL-padded to 16 bytes
//! (IFNAMSIZ), at most 15 used, so the field stays a C string. Both the controller (which
//! writes them) and the CLI (which reads them without the config) use these two helpers.

use crate::{ClassInfo, NicInfo};

/// `name` NUL-padded to 16 bytes; longer names are cut at 15 bytes.
pub fn padded(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// The name in a NUL-padded field (see [`padded`]); a field that is not UTF-8 reads as
/// its longest valid prefix.
pub fn from_padded(field: &[u8; 16]) -> &str {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    match core::str::from_utf8(&field[..end]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&field[..e.valid_up_to()]).unwrap_or(""),
    }
}

impl NicInfo {
    /// The interface name this entry was written for.
    pub fn name(&self) -> &str {
        from_padded(&self.name)
    }
}

impl ClassInfo {
    /// The class's configured name.
    pub fn name(&self) -> &str {
        from_padded(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_cuts_at_15_bytes() {
        assert_eq!(from_padded(&padded("eth0")), "eth0");
        assert_eq!(from_padded(&padded("a-very-long-interface")), "a-very-long-int");
        assert_eq!(padded("a-very-long-interface")[15], 0);
        let mut bad = padded("ok");
        bad[2] = 0xff;
        assert_eq!(from_padded(&bad), "ok");
    }
}
