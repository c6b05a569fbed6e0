//! State gossip messages and replies off the wire, fed to a node holding
//! some state: no bytes, and no delta, version or run they claim, panics it.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_membership::spread::{Msg, Reply, RunId, Spread, SpreadConfig};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let from = "127.0.0.1:2".parse().unwrap();
    let me = RunId {
        name: Arc::from("me"),
        generation: 1,
        addr: "127.0.0.1:1".parse().unwrap(),
    };
    let mut spread = Spread::new(SpreadConfig::default(), me, 7, now);
    spread.set("record", "r");
    spread.set("load", "l");
    if let Ok(reply) = postcard::from_bytes::<Reply>(data) {
        let _ = spread.on_reply(from, reply, now);
    }
    if let Ok(msg) = postcard::from_bytes::<Msg>(data) {
        let _ = spread.on_message(from, msg.clone(), now);
        let _ = spread.on_message(from, msg, now + Duration::from_millis(1));
    }
    let _ = spread.tick(now + Duration::from_secs(5), &[from]);
});
