//! Decoders of untrusted bytes never panic, whatever they are fed: random
//! bytes and mutations of valid encodings (a property-based fuzz that runs
//! in every `cargo test`).

use proptest::prelude::*;
use shoal_transport::tls::{Admission, ClusterCa};
use shoal_transport::{decode_frame, encode_frame, Service};

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
    if !bytes.is_empty() {
        for (pos, val) in edits {
            let i = pos % bytes.len();
            bytes[i] ^= val;
        }
    }
    let keep = bytes.len().saturating_sub(cut % (bytes.len() + 1));
    bytes.truncate(keep);
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn frame_decoder(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn frame_decoder_on_mutated_frames(body in prop::collection::vec(any::<u8>(), 0..256), edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4), cut in any::<usize>()) {
        let frame = encode_frame(Service::Probe, body).unwrap();
        let _ = decode_frame(&mutate(frame, &edits, cut));
    }

    #[test]
    fn join_token_decoder(s in ".{0,400}", raw in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = Admission::parse(&s);
        let _ = Admission::parse(&format!("shoal1-{s}"));
        let _ = Admission::parse(&format!("shoal2-{s}"));
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        let _ = Admission::parse(&format!("shoal1-{b64}"));
        let _ = Admission::parse(&format!("shoal2-{b64}"));
    }
}

#[test]
fn join_token_decoder_on_mutated_tokens() {
    let ca = ClusterCa::generate("fuzz").unwrap();
    let now = std::time::SystemTime::now();
    let original = ca
        .join_token(std::time::Duration::from_secs(600), now)
        .unwrap();
    let join = original.encode();
    for token in [ca.encode(), join.clone()] {
        let bytes = token.as_bytes().to_vec();
        for i in 0..bytes.len() {
            for flip in [1u8, 0x20, 0x7f] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                if let Ok(s) = String::from_utf8(b) {
                    // A changed join token that still decodes is never
                    // admitted: the MAC covers every field.
                    if let Ok(Admission::Token(t)) = Admission::parse(&s) {
                        if t != original {
                            assert!(ca.check_token(&t, now).is_err(), "mutation at {i} admitted");
                        }
                    }
                }
            }
            let _ = Admission::parse(&token[..i]);
        }
    }
}
