//! Helpers shared by the membership integration tests.

use std::time::{Duration, Instant};

use shoal_membership::MembershipView;

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
