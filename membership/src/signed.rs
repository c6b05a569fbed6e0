//! The signed form of every value a node publishes in gossip.
//!
//! Gossip is relayed, so a value about node X must prove that X wrote it.
//! X publishes each value as `<seq>.<signature>.<kind><payload>`:
//! - `seq` counts X's writes in this run (generation): a reader keeps, per
//!   key, the value of the highest `seq` it verified, so a relay cannot
//!   roll a key back to an older value of X's;
//! - `kind` is `=` for a value and `-` for "no such key": X never deletes a
//!   key from gossip (a deletion would carry no signature), it writes a
//!   signed absence instead, so a relay cannot delete X's keys either;
//! - the signature, by X's certificate key, covers X's name, generation and
//!   gossip address, the key, `seq`, `kind` and the payload: a value cannot
//!   be moved to another node, another run of X, another address or
//!   another key.
//!
//! X's certificate is published beside (key [`CERT_KEY`], base64url DER);
//! it proves itself, by chaining to a CA the reader trusts and naming X.
//! This module is pure (no cryptography): the runtime passes signing and
//! verifying in.

use std::net::SocketAddr;

use base64::Engine as _;

/// Key of the publishing node's certificate (base64url DER, unsigned: it
/// is checked against the cluster CA).
pub const CERT_KEY: &str = "cert";

/// Longest signature accepted, bytes (DER ECDSA P-256 is at most 72).
const SIGNATURE_LEN_MAX: usize = 80;

/// Longest `seq` field, digits (u64).
const SEQ_DIGITS_MAX: usize = 20;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// Who published a value: the node's name, its generation and its gossip
/// address, all covered by the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// Node name.
    pub name: &'a str,
    /// Node generation (the run).
    pub generation: u64,
    /// Gossip address.
    pub addr: SocketAddr,
}

/// The bytes a node signs for `key` = `payload` (`None`: the key is absent)
/// as its `seq`th write. Every variable-length field but the last is
/// length-prefixed, so no two distinct writes sign the same bytes whatever
/// their fields contain.
pub fn message(origin: Origin<'_>, key: &str, seq: u64, payload: Option<&str>) -> Vec<u8> {
    let addr = origin.addr.to_string();
    let mut m = Vec::with_capacity(
        64 + origin.name.len() + addr.len() + key.len() + payload.map_or(0, str::len),
    );
    let field = |m: &mut Vec<u8>, bytes: &[u8]| {
        // Names, addresses and keys are far below 4 GiB; saturating keeps
        // the function total all the same.
        m.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
        m.extend_from_slice(bytes);
    };
    m.extend_from_slice(b"shoal-gossip/2\0");
    field(&mut m, origin.name.as_bytes());
    m.extend_from_slice(&origin.generation.to_be_bytes());
    field(&mut m, addr.as_bytes());
    field(&mut m, key.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    match payload {
        Some(p) => {
            m.push(b'=');
            m.extend_from_slice(p.as_bytes());
        }
        None => m.push(b'-'),
    }
    m
}

/// The published text of a signed write.
pub fn encode(seq: u64, signature: &[u8], payload: Option<&str>) -> String {
    let sig = b64().encode(signature);
    match payload {
        Some(p) => format!("{seq}.{sig}.={p}"),
        None => format!("{seq}.{sig}.-"),
    }
}

/// A signed write as read from gossip, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<'a> {
    /// The publisher's write counter.
    pub seq: u64,
    /// The signature (DER).
    pub signature: Vec<u8>,
    /// The value, or `None` for a signed absence.
    pub payload: Option<&'a str>,
}

/// Parses a published text; `None` when it is not a signed write.
pub fn parse(text: &str) -> Option<Signed<'_>> {
    let (seq, rest) = text.split_once('.')?;
    if seq.is_empty() || seq.len() > SEQ_DIGITS_MAX || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = seq.parse().ok()?;
    let (sig, rest) = rest.split_once('.')?;
    // Base64 of SIGNATURE_LEN_MAX bytes, rounded up.
    if sig.len() > SIGNATURE_LEN_MAX.div_ceil(3) * 4 {
        return None;
    }
    let signature = b64().decode(sig).ok()?;
    if signature.is_empty() || signature.len() > SIGNATURE_LEN_MAX {
        return None;
    }
    let payload = match rest.as_bytes().first()? {
        b'=' => Some(&rest[1..]),
        b'-' if rest.len() == 1 => None,
        _ => return None,
    };
    Some(Signed {
        seq,
        signature,
        payload,
    })
}

/// The text of a certificate under [`CERT_KEY`].
pub fn encode_cert(der: &[u8]) -> String {
    b64().encode(der)
}

/// The certificate published under [`CERT_KEY`], at most `len_max` bytes.
pub fn parse_cert(text: &str, len_max: usize) -> Option<Vec<u8>> {
    if text.len() > len_max.div_ceil(3) * 4 {
        return None;
    }
    b64().decode(text).ok().filter(|d| d.len() <= len_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin<'static> {
        Origin {
            name: "n1",
            generation: 7,
            addr: "127.0.0.1:7000".parse().unwrap(),
        }
    }

    #[test]
    fn writes_round_trip_and_the_message_binds_every_field() {
        let sig = vec![0x30, 1, 2, 3];
        for payload in [Some("{\"a\":1}"), Some(""), Some("x.y.=z"), None] {
            let text = encode(42, &sig, payload);
            let parsed = parse(&text).unwrap();
            assert_eq!(parsed.seq, 42);
            assert_eq!(parsed.signature, sig);
            assert_eq!(parsed.payload, payload);
        }
        let m = message(origin(), "load", 3, Some("v"));
        let others = [
            message(
                Origin {
                    name: "n2",
                    ..origin()
                },
                "load",
                3,
                Some("v"),
            ),
            message(
                Origin {
                    generation: 8,
                    ..origin()
                },
                "load",
                3,
                Some("v"),
            ),
            message(
                Origin {
                    addr: "127.0.0.2:7000".parse().unwrap(),
                    ..origin()
                },
                "load",
                3,
                Some("v"),
            ),
            message(origin(), "inc", 3, Some("v")),
            message(origin(), "load", 4, Some("v")),
            message(origin(), "load", 3, Some("w")),
            message(origin(), "load", 3, None),
            message(origin(), "load", 3, Some("")),
        ];
        for o in others {
            assert_ne!(m, o);
        }
        // No ambiguity from the separators: a name cannot absorb the key.
        assert_ne!(
            message(
                Origin {
                    name: "a",
                    ..origin()
                },
                "b\0c",
                1,
                None
            ),
            message(
                Origin {
                    name: "a\0b",
                    ..origin()
                },
                "c",
                1,
                None
            )
        );
    }

    #[test]
    fn malformed_writes_are_refused() {
        for text in [
            "",
            "1",
            "1.",
            "1.AAAA",
            "1.AAAA.",
            "1.AAAA.x",
            "1.AAAA.-x",
            "x.AAAA.=v",
            "-1.AAAA.=v",
            "1..=v",
            "1.!!!!.=v",
            "99999999999999999999999.AAAA.=v",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
        let long_sig = format!("1.{}.=v", "A".repeat(200));
        assert_eq!(parse(&long_sig), None);
        assert_eq!(parse_cert("!!", 100), None);
        assert_eq!(parse_cert(&"A".repeat(1000), 100), None);
        assert_eq!(parse_cert(&encode_cert(b"der"), 100), Some(b"der".to_vec()));
    }
}
