//! Parsing the sizes, durations and link rates operators type: `256M`, `1G`, `64k`,
//! `25ms`, `2s`, `1gbit`.

use std::time::Duration;

/// A size or duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a number with a known suffix.
    #[error("{0:?} is not a size (examples: 4096, 64k, 256M, 1G)")]
    Size(String),
    /// Not a number with a known suffix.
    #[error("{0:?} is not a duration (examples: 25ms, 2s, 500us)")]
    Duration(String),
    /// Not a positive number of bits per second with a known suffix.
    #[error("{0:?} is not a link rate (examples: 100mbit, 1gbit, 2.5gbit)")]
    Rate(String),
}

/// Parse a link rate in bits per second: a positive number followed by `kbit`, `mbit`,
/// `gbit` (powers of 1000, as network links are rated; case-insensitive) or `bit`.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError::Rate(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = [("kbit", 1e3), ("mbit", 1e6), ("gbit", 1e9), ("bit", 1.0)]
        .iter()
        .find_map(|&(suffix, m)| t.strip_suffix(suffix).map(|n| (n.to_string(), m)))
        .ok_or_else(err)?;
    let v: f64 = num.trim().parse().map_err(|_| err())?;
    let bits = v * mult;
    if !(1.0..=1e15).contains(&bits) {
        return Err(err());
    }
    // In range 1..=1e15: positive and exact in a u64.
    #[allow(clippy::cast_sign_loss)]
    Ok(bits.round() as u64)
}

/// Parse a byte size: a number with an optional `k`, `M`, `G` suffix (powers of 1024;
/// case-insensitive, an optional trailing `B` or `iB`).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError::Size(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(err()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| err())?;
    n.checked_mul(mult).ok_or_else(err)
}

/// Parse a duration: a number followed by `us`, `ms`, `s` (a bare number is milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let err = || UnitError::Duration(s.to_string());
    let t = s.trim();
    let (num, unit) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    let v: f64 = num.trim().parse().map_err(|_| err())?;
    if !v.is_finite() || v < 0.0 {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(v * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("2.5gbit"), Ok(2_500_000_000));
        assert_eq!(parse_rate(" 64kbit "), Ok(64_000));
        assert_eq!(parse_rate("9600bit"), Ok(9600));
        for bad in [
            "1g",
            "gbit",
            "-1gbit",
            "0mbit",
            "nanbit",
            "1e300gbit",
            "100",
        ] {
            assert_eq!(parse_rate(bad), Err(UnitError::Rate(bad.into())), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("25ms"), Ok(Duration::from_millis(25)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_millis(40)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
