//! SWIM's probe messages and replies off the wire, fed to a detector: no
//! bytes, and no claim they carry, panics it.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_membership::swim::{ProbeMsg, ProbeReply, Swim};
use shoal_membership::SwimConfig;

fuzz_target!(|data: &[u8]| {
    let _ = postcard::from_bytes::<ProbeReply>(data);
    let Ok(msg) = postcard::from_bytes::<ProbeMsg>(data) else {
        return;
    };
    let now = Instant::now();
    let mut swim = Swim::new(
        SwimConfig::lan(),
        "me",
        1,
        "127.0.0.1:1".parse().unwrap(),
        7,
    );
    match msg {
        ProbeMsg::Ping {
            from,
            target,
            view_of_you,
        } => {
            let _ = swim.on_ping(from, &target, view_of_you, now);
        }
        ProbeMsg::Updates(updates) => {
            let _ = swim.on_updates(updates.clone(), now);
            let _ = swim.on_updates(updates, now + Duration::from_secs(1));
        }
        _ => {}
    }
    let _ = swim.tick(now + Duration::from_secs(5));
});
