//! Places many slots on 1,000 nodes in a loop, for profilers
//! (`valgrind --tool=callgrind target/release/examples/profile_place`).
use std::collections::BTreeMap;

use shoal_placement::{place_with, Node, NodeIndex, PlacementConfig, SlotRequest};

fn main() {
    let sizes = [2000u64, 4000, 8000, 16000, 32000, 64000];
    let nodes: Vec<Node> = (0..1000)
        .map(|i| {
            Node::new(
                format!("node-{i:04}"),
                sizes[i % 6] * 10,
                sizes[(i / 6) % 6] * 40,
            )
        })
        .collect();
    let index = NodeIndex::new(&nodes);
    let config = PlacementConfig::default();
    let empty = BTreeMap::new();
    let mut wins = 0usize;
    for slot in 0..20_000u32 {
        let req = SlotRequest::simple("job", slot, 100, 100);
        if place_with(&req, &nodes, &index, &empty, &config).is_ok() {
            wins += 1;
        }
    }
    println!("{wins}");
}
