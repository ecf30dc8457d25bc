//! Rates in bits per second, written the way tc writes them ("20mbit", "1.5gbit").

const RATE_UNITS: [(&str, u64); 4] = [("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1_000), ("bit", 1)];

/// Parses a rate in bits per second the way tc writes it ("20mbit", "1.5gbit", "800kbit").
/// Only bit units: tc reads "mbps" as megabytes per second, a factor of 8 nobody should
/// have to remember in a config file.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    const ACCEPTED: &str = "expected a rate in bits per second with one of the units bit, kbit, mbit, gbit \
                            (1000-based), e.g. \"20mbit\", \"1.5gbit\", \"800kbit\"";
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.to_ascii_lowercase();
    let Some(&(_, mult)) = RATE_UNITS.iter().find(|(u, _)| *u == unit) else {
        if unit.ends_with("bps") {
            return Err(format!("invalid rate {s:?}: bytes-per-second units are not accepted; {ACCEPTED}"));
        }
        return Err(format!("invalid rate {s:?}: {ACCEPTED}"));
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits_ok(int) || !digits_ok(frac) || (number.contains('.') && frac.is_empty()) {
        return Err(format!("invalid rate {s:?}: {ACCEPTED}"));
    }
    // Exact decimal arithmetic: "1.1gbit" must be 1100000000, not a float's neighbour.
    let too_large = || format!("invalid rate {s:?}: too large");
    let scale = 10u128.checked_pow(frac.len() as u32).ok_or_else(too_large)?;
    let int: u128 = int.parse().map_err(|_| too_large())?;
    let frac: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| too_large())? };
    let scaled = int.checked_mul(scale).and_then(|v| v.checked_add(frac)).and_then(|v| v.checked_mul(u128::from(mult)));
    let scaled = scaled.ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!("invalid rate {s:?}: not a whole number of bits per second"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

/// Writes a rate the way `parse_rate` reads it, in the largest unit that keeps it exact
/// within three decimals ("20mbit", "1.5gbit", "999bit").
pub fn format_rate(bps: u64) -> String {
    for (unit, mult) in RATE_UNITS {
        let milli = (mult / 1000).max(1);
        if bps >= mult && bps.is_multiple_of(milli) {
            let (whole, rest) = (bps / mult, bps % mult);
            if rest == 0 {
                return format!("{whole}{unit}");
            }
            let frac = format!("{:03}", rest / milli);
            return format!("{whole}.{}{unit}", frac.trim_end_matches('0'));
        }
    }
    format!("{bps}bit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tc_bit_units() {
        assert_eq!(parse_rate("20mbit"), Ok(20_000_000));
        assert_eq!(parse_rate("1.5gbit"), Ok(1_500_000_000));
        assert_eq!(parse_rate("800kbit"), Ok(800_000));
        assert_eq!(parse_rate("64bit"), Ok(64));
        assert_eq!(parse_rate("1.1GBit"), Ok(1_100_000_000));
        assert_eq!(parse_rate("0mbit"), Ok(0));
        assert_eq!(parse_rate(" 10Mbit "), Ok(10_000_000));
        assert_eq!(parse_rate("100gbit"), Ok(100_000_000_000));
    }

    #[test]
    fn rejects_everything_else() {
        let bad_rates = [
            "",
            "mbit",
            "20",
            "20mbps",
            "20MBps",
            "20kbps",
            "-5mbit",
            "5 mbit",
            "1.mbit",
            ".5mbit",
            "1e6bit",
            "2tbit",
            "1.0005kbit",
            "99999999999999999999gbit",
        ];
        for bad in bad_rates {
            let e = parse_rate(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(parse_rate("20mbps").unwrap_err().contains("bytes-per-second"));
        assert!(parse_rate("fast").unwrap_err().contains("bit, kbit, mbit, gbit"));
    }

    #[test]
    fn formats_exactly_in_the_largest_unit() {
        assert_eq!(format_rate(20_000_000), "20mbit");
        assert_eq!(format_rate(1_500_000_000), "1.5gbit");
        assert_eq!(format_rate(800_000), "800kbit");
        assert_eq!(format_rate(999), "999bit");
        assert_eq!(format_rate(0), "0bit");
        assert_eq!(format_rate(1_234_567), "1234.567kbit");
        for bps in [0, 1, 7, 999, 1000, 1001, 1_234_567, 20_000_000, 1_500_000_000, 123_456_789_012, u64::MAX] {
            assert_eq!(parse_rate(&format_rate(bps)), Ok(bps), "{}", format_rate(bps));
        }
    }
}
