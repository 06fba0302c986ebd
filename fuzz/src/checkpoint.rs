//! `checkpoint`: checkpoint container, `latest_chain` and the host's delta-chain acceptance.
//!
//! The checkpoint container over the input as a checkpoint file or a stream of
//! blobs a guest handed over: `latest_chain` as a restore reads it, and each blob in turn
//! through the host's delta-chain acceptance (`hand_over` into a [`Latest`]), as the doorbell
//! takes them. What was accepted must read back as the same chain.
//!
//! The first input byte is a mode: bit 0 recomputes every blob's checksum and bit 1 links each
//! delta to the full checkpoint before it, so the fuzzer gets past both checks at will.

use std::sync::Arc;
use std::time::Duration;

use abi::checkpoint::{decode_blob, describe_chain, latest_chain, DELTA_MAGIC, MAGIC};
use vmm::checkpoint::{hand_over, Chain, Latest};

use crate::Input;

/// Blobs handed over per input.
const MAX_BLOBS: usize = 64;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut bytes = input.rest().to_vec();
    if mode & 1 != 0 {
        fix_up(&mut bytes, mode & 2 != 0);
    }

    if let Ok(chain) = latest_chain(&bytes) {
        let _ = describe_chain(&chain);
        let again = latest_chain(chain.bytes).expect("a chain's own bytes hold a chain");
        assert_eq!(again, chain, "a chain's bytes read back as the same chain");
    }

    let latest = Arc::new(Latest::default());
    let mut chain = Chain::default();
    let mut accepted: Option<usize> = None; // deltas since the last accepted full checkpoint
    let mut at = 0;
    for _ in 0..MAX_BLOBS {
        let rest = &bytes[at..];
        match hand_over(&mut chain, rest, [&mut latest.clone()]) {
            Ok((len, full)) => {
                accepted = Some(if full {
                    0
                } else {
                    accepted.map_or(0, |n| n + 1)
                });
                at += len;
            }
            Err(_) => match decode_blob(rest) {
                Ok((_, len)) => at += len,
                Err(_) => break,
            },
        }
    }
    if let Some(deltas) = accepted {
        let stored = latest
            .wait_after(0, Duration::ZERO)
            .expect("an accepted checkpoint was recorded");
        let chain = latest_chain(&stored).expect("the recorded chain decodes");
        assert_eq!(
            chain.deltas.len(),
            deltas,
            "every accepted delta continues the chain"
        );
        assert_eq!(
            chain.bytes.len(),
            stored.len(),
            "nothing recorded is left over"
        );
    }
}

/// Walks the blobs in `bytes` by their length fields, rewriting each checksum (and, with
/// `link`, each delta's base id) so the blobs verify.
fn fix_up(bytes: &mut [u8], link: bool) {
    let mut at = 0;
    let mut base_id = None;
    while let Some(end) = blob_end(bytes, at) {
        let delta = bytes[at..at + 8] == DELTA_MAGIC[..];
        if delta && link {
            if let Some(id) = base_id {
                let name_len = usize::from(u16::from_le_bytes([bytes[at + 12], bytes[at + 13]]));
                let base = at + 14 + name_len + 4;
                bytes[base..base + 4].copy_from_slice(&u32::to_le_bytes(id));
            }
        }
        let crc = crc32fast::hash(&bytes[at..end]);
        bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        if !delta {
            base_id = Some(crc);
        }
        at = end + 4;
    }
}

/// Where the checksum of the blob at `at` starts, if its header and payload are all there.
fn blob_end(bytes: &[u8], at: usize) -> Option<usize> {
    let magic = bytes.get(at..at + 8)?;
    let delta = magic == DELTA_MAGIC;
    if !delta && magic != MAGIC {
        return None;
    }
    let name_len = usize::from(u16::from_le_bytes(
        bytes.get(at + 12..at + 14)?.try_into().ok()?,
    ));
    let len_at = at + 14 + name_len + 4 + if delta { 12 } else { 0 };
    let payload_len = u64::from_le_bytes(bytes.get(len_at..len_at + 8)?.try_into().ok()?);
    let end = (len_at + 8).checked_add(usize::try_from(payload_len).ok()?)?;
    (end.checked_add(4)? <= bytes.len()).then_some(end)
}
