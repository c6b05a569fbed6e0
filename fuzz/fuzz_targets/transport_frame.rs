//! Transport frames off the wire, and chitchat messages as the gossip
//! adapter reads them (its heartbeat rewrite runs before chitchat's own
//! decoder): garbage decodes to nothing, never a panic.
#![no_main]

use chitchat::{ChitchatMessage, Deserializable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = shoal_transport::decode_frame(data);
    let mut body = data.to_vec();
    if shoal_transport::gossip::rewrite_heartbeats(&mut body, |id| id.generation_id) {
        let _ = ChitchatMessage::deserialize(&mut body.as_slice());
    }
});
