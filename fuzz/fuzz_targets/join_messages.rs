//! The messages of `Service::Join`, from a joining node (unauthenticated)
//! or a member (a CA rotation step): decoded, and checked as a member
//! checks them, garbage is refused, never a panic.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use shoal_transport::join::{JoinReply, JoinRequest, Rotation, RotationReply};
use shoal_transport::tls::{ClusterCa, JoinToken};

fn ca() -> &'static ClusterCa {
    static CA: OnceLock<ClusterCa> = OnceLock::new();
    CA.get_or_init(|| ClusterCa::generate("fuzz").expect("a CA"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = JoinRequest::decode(data) {
        if let Ok(token) = JoinToken::parse(&req.token) {
            let _ = ca().check_token(&token, SystemTime::now());
        }
    }
    if let Ok(JoinReply::Joined { ca, .. }) = serde_json::from_slice::<JoinReply>(data) {
        let _ = ClusterCa::decode(&ca);
    }
    if let Ok(Rotation::Trust { ca }) = serde_json::from_slice::<Rotation>(data) {
        // A member keeps a new CA only if it can issue with it.
        if let Ok(next) = ClusterCa::decode(&ca) {
            let _ = next.issue_node_for("n", Duration::from_secs(60));
        }
    }
    let _ = serde_json::from_slice::<RotationReply>(data);
});
