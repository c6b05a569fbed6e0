//! The probe protocol decoder never panics on untrusted bytes.

use proptest::prelude::*;
use shoal_membership::swim::{ProbeMsg, ProbeReply, Update};
use shoal_membership::{NodeRecord, NodeState};

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn probe_decoders(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = postcard::from_bytes::<ProbeMsg>(&bytes);
        let _ = postcard::from_bytes::<ProbeReply>(&bytes);
        let _ = serde_json::from_slice::<NodeRecord>(&bytes);
    }

    #[test]
    fn probe_decoder_on_mutated_messages(pos in any::<usize>(), val in any::<u8>(), cut in 0usize..64) {
        let msg = ProbeMsg::Updates(vec![Update {
            name: "n1".into(),
            generation: 7,
            addr: "127.0.0.1:4700".parse().unwrap(),
            incarnation: 3,
            state: NodeState::Suspect,
            by: "n2".into(),
        }]);
        let mut bytes = postcard::to_stdvec(&msg).unwrap();
        let i = pos % bytes.len();
        bytes[i] ^= val;
        bytes.truncate(bytes.len().saturating_sub(cut));
        let _ = postcard::from_bytes::<ProbeMsg>(&bytes);
    }
}
