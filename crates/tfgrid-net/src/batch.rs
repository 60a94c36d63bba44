//! Several WireGuard datagrams in one relayed message: each relayed message costs a seal, a
//! websocket frame and a relay hop, so a burst to one peer travels as one. The format is a
//! sequence of (u16 big-endian length, bytes); a message that does not parse exactly is dropped
//! whole.

/// Largest batch payload: well under the bus's 4 MiB message limit, and a burst's worth.
pub const MAX_BATCH: usize = 60 * 1024;

/// Appends one datagram to `batch`. False (and nothing appended) when it would not fit.
pub fn push(batch: &mut Vec<u8>, datagram: &[u8]) -> bool {
    if datagram.is_empty()
        || datagram.len() > u16::MAX as usize
        || batch.len() + 2 + datagram.len() > MAX_BATCH
    {
        return false;
    }
    batch.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    batch.extend_from_slice(datagram);
    true
}

/// The datagrams of a batch, or `None` if it is malformed (truncated, an empty entry, too big).
pub fn unpack(batch: &[u8]) -> Option<Vec<&[u8]>> {
    if batch.len() > MAX_BATCH {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = batch;
    while !rest.is_empty() {
        if rest.len() < 2 {
            return None;
        }
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        if n == 0 || rest.len() < 2 + n {
            return None;
        }
        out.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_refuses_what_does_not_fit() {
        let mut b = Vec::new();
        assert!(push(&mut b, b"one"));
        assert!(push(&mut b, &[7u8; 1452]));
        assert!(!push(&mut b, b""));
        assert_eq!(unpack(&b).unwrap(), vec![&b"one"[..], &[7u8; 1452][..]]);
        let mut full = Vec::new();
        while push(&mut full, &[1u8; 1452]) {}
        assert!(full.len() <= MAX_BATCH && full.len() + 1454 > MAX_BATCH);
        assert_eq!(unpack(&full).unwrap().len(), full.len() / 1454);
    }

    #[test]
    fn malformed_batches_are_dropped_whole() {
        for bad in [&[0u8][..], &[0, 5, 1, 2], &[0, 0], &[0, 1, 9, 0]] {
            assert!(unpack(bad).is_none(), "{bad:?}");
        }
        assert!(unpack(&vec![0u8; MAX_BATCH + 1]).is_none());
    }

    proptest! {
        #[test]
        fn any_bytes_unpack_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Some(parts) = unpack(&bytes) {
                let total: usize = parts.iter().map(|p| p.len() + 2).sum();
                prop_assert_eq!(total, bytes.len());
            }
        }
    }
}
