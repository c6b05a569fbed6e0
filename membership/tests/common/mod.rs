//! Helpers shared by the membership integration tests (each test crate
//! uses some of them).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_membership::{Membership, MembershipConfig, MembershipView, NodeRecord};
use shoal_transport::tls::NodeCredentials;
use shoal_transport::{QuicConfig, QuicTransport, Transport};

/// A record a view tells from the bare one it shows before reading any.
pub fn record(name: &str, addr: SocketAddr) -> NodeRecord {
    NodeRecord {
        version: "test".into(),
        ..NodeRecord::bare(name, addr)
    }
}

/// A member `name` over QUIC on a loopback port, generation 1, publishing
/// [`record`].
pub async fn member_with(
    creds: &NodeCredentials,
    name: &str,
    config: MembershipConfig,
) -> (QuicTransport, Membership) {
    let (t, mut inbox) =
        QuicTransport::bind("127.0.0.1:0".parse().unwrap(), creds, QuicConfig::default())
            .await
            .unwrap();
    let m = Membership::start(
        t.clone(),
        &mut inbox,
        record(name, t.local_addr()),
        1,
        t.signer(),
        config,
    )
    .await
    .unwrap();
    (t, m)
}

/// Waits, at most 30 s, until `ok` holds of the view; fails naming `what`
/// and the members last seen.
pub async fn wait_for(
    view: &mut tokio::sync::watch::Receiver<MembershipView>,
    what: &str,
    ok: impl Fn(&MembershipView) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ok(&view.borrow_and_update()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}: {:?}",
            view.borrow().members
        );
        let _ = tokio::time::timeout(left, view.changed()).await;
    }
}
