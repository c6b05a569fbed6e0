//! A node whose state takes more than one gossip message renews its
//! certificate; a node that joins afterwards still reads all of it. Deltas
//! are cut by size, oldest writes first, and a reader that does not hold
//! the run can check them only against a certificate they carry: so the
//! certificate must stay the run's oldest write across renewals.

mod common;
use common::{member_with, wait_for};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_membership::spread::SpreadConfig;
use shoal_membership::{Membership, MembershipConfig, MembershipView, NodeState};
use shoal_transport::tls::{ClusterCa, NodeCredentials};
use shoal_transport::{QuicTransport, Transport};

const CLUSTER: &str = "renewal";

async fn member(
    creds: &NodeCredentials,
    name: &str,
    seeds: Vec<SocketAddr>,
) -> (QuicTransport, Membership) {
    let config = MembershipConfig {
        cluster_id: CLUSTER.into(),
        seeds,
        // Small messages, so that a's state needs several.
        spread: SpreadConfig {
            message_bytes_max: 4 * 1024,
            ..SpreadConfig::default()
        },
        ..MembershipConfig::default()
    };
    member_with(creds, name, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_after_a_renewal_reads_a_state_larger_than_a_message() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let a_creds = ca.issue_node("a").unwrap();
    let (ta, ma) = member(&a_creds, "a", vec![]).await;
    let a_addr = ta.local_addr();
    // About 12 KB of application values: three or more messages.
    let values: std::collections::BTreeMap<String, String> = (0..40)
        .map(|i| (format!("k{i:02}"), format!("{i}:{}", "v".repeat(300))))
        .collect();
    ma.publish_app(Arc::new(values.clone()));
    let (_tb, mb) = member(&ca.issue_node("b").unwrap(), "b", vec![a_addr]).await;
    let mut view_b = mb.view();
    let all = |v: &MembershipView| {
        v.get("a").is_some_and(|m| {
            m.state == NodeState::Alive && m.record.version == "test" && m.app.len() == 40
        })
    };
    wait_for(&mut view_b, "b to read a's state", all).await;

    // a renews its certificate (same key), then writes once more.
    let renewed = ca
        .issue_node_keyed("a", Duration::from_secs(3600), Some(&a_creds.key_der))
        .unwrap();
    ta.set_credentials(&renewed).unwrap();
    let mut later = values.clone();
    later.insert("late".into(), "after the renewal".into());
    ma.publish_app(Arc::new(later));
    let late = |v: &MembershipView| {
        v.get("a").is_some_and(|m| {
            m.app.len() == 41
                && m.app
                    .get("late")
                    .is_some_and(|v| &**v == "after the renewal")
        })
    };
    wait_for(&mut view_b, "b to read a's write after the renewal", late).await;

    // c joins now: it reads everything of a, in pieces.
    let (_tc, mc) = member(&ca.issue_node("c").unwrap(), "c", vec![a_addr]).await;
    let mut view_c = mc.view();
    wait_for(&mut view_c, "c to read all of a's state", |v| {
        all(v) || late(v)
    })
    .await;
    wait_for(&mut view_c, "c to read a's write after the renewal", late).await;
}
