//! Values peers publish in gossip: instance parts, unplaced slots, host
//! ports, node records and loads, and the signed form every value travels
//! in. Garbage yields nothing, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_core::gossip::{decode_part, decode_ports, Unplaced};
use shoal_core::instance::Published;
use shoal_membership::signed;
use shoal_membership::{Load, NodeRecord};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(s) = signed::parse(text) {
        // What the reader then signs over must be computable for any of it.
        let origin = signed::Origin {
            name: "n",
            generation: s.seq,
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        let _ = signed::message(origin, text, s.seq, s.payload);
    }
    let _ = signed::parse_cert(text, 8192);
    let _ = decode_part::<Published>(text);
    let _ = decode_part::<Unplaced>(text);
    let _ = decode_ports(text);
    if let Ok(r) = serde_json::from_str::<NodeRecord>(text) {
        let _ = r.validate();
    }
    if let Ok(l) = serde_json::from_str::<Load>(text) {
        let _ = l.is_plausible();
    }
});
