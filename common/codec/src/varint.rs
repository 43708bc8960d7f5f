//! LEB128 varints and zigzag signed deltas, used by page records and frames.

/// Append `v` as an unsigned LEB128 varint (1 to 10 bytes).
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Read an unsigned LEB128 varint from the front of `buf`: the value and bytes used.
/// `None` if it is truncated or longer than 10 bytes / overflows 64 bits.
pub fn get(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7f);
        if i == 9 && bits > 1 {
            return None;
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Zigzag-encode the signed distance `to - from` as a varint.
pub fn put_delta(out: &mut Vec<u8>, from: u64, to: u64) {
    let d = to.wrapping_sub(from).cast_signed();
    put(out, ((d << 1) ^ (d >> 63)).cast_unsigned());
}

/// Read a zigzag delta and apply it to `from`.
pub fn get_delta(buf: &[u8], from: u64) -> Option<(u64, usize)> {
    let (z, n) = get(buf)?;
    // Zigzag: 0, 1, 2, 3 … decode to 0, -1, 1, -2 …
    let d = (z >> 1) ^ (z & 1).wrapping_neg();
    Some((from.wrapping_add(d), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(v in any::<u64>(), from in any::<u64>()) {
            let mut b = Vec::new();
            put(&mut b, v);
            prop_assert_eq!(get(&b), Some((v, b.len())));
            let mut b = Vec::new();
            put_delta(&mut b, from, v);
            prop_assert_eq!(get_delta(&b, from), Some((v, b.len())));
        }
    }

    #[test]
    fn rejects_truncated_and_overlong() {
        assert_eq!(get(&[0x80]), None);
        assert_eq!(get(&[0xff; 11]), None);
        assert_eq!(
            get(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            None
        );
        let mut b = Vec::new();
        put_delta(&mut b, 10, 9);
        assert_eq!(b, vec![1]);
    }
}
