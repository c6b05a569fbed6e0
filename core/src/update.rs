//! Rolling updates: the `[update]` settings of a job and the rule that
//! decides, at every node and from its own view, which slots of a service
//! move to a new version now.
//!
//! **The window.** A slot is *ready* when some live node publishes a copy
//! of it running the job's current task that has passed its checks for
//! `min_healthy_time` (the holder says so: `k` in its gossip entry). The
//! window is the first `max_parallel` slots, in slot order, that are not
//! ready. Only slots in the window move:
//!
//! - `start-first`: the coordinator places a copy of the new version for
//!   a window slot beside its old copy; the holder of the old copy stops it
//!   once the slot is ready (whatever the window).
//! - `stop-first`: the holder of a window slot's old copy stops it; the
//!   coordinator places the new copy once the slot has no live copy.
//!
//! Why it holds with views that differ: readiness only grows while nothing
//! fails, so a stale view sees fewer ready slots, never more. Its window
//! then lies at or before the true one, and every slot it lets move that is
//! truly not ready is also in the true window: at most `max_parallel` slots
//! are being replaced at once (the proof: a stale not-ready set S' contains
//! the true one S, so the `max_parallel`-th element of S' is at or before
//! that of S). A stale holder under start-first waits longer before it
//! stops an old copy (surge), never stops one early; a version whose copies
//! never become ready keeps the window on its first `max_parallel` slots.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which copy goes first when a slot moves to a new version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// The new copy runs and is ready before the old one stops (default).
    #[default]
    StartFirst,
    /// The old copy stops, then the new one starts (host ports, or no room
    /// for both).
    StopFirst,
}

/// `[update]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSpec {
    /// Slots replaced at once (default 1).
    #[serde(default = "default_max_parallel")]
    pub max_parallel: u32,
    /// `start-first` (default) or `stop-first`.
    #[serde(default)]
    pub order: Order,
    /// How long a new copy must pass its checks before it counts as ready
    /// (default 0 s).
    #[serde(default, with = "crate::job::humantime_serde_str")]
    pub min_healthy_time: Duration,
    /// A copy of the new version not ready this long after it was placed
    /// fails the update (default 5 min).
    #[serde(
        default = "default_healthy_deadline",
        with = "crate::job::humantime_serde_str"
    )]
    pub healthy_deadline: Duration,
    /// The update fails when no slot became ready for this long while
    /// it was not finished (default 10 min, at least `healthy_deadline`;
    /// 0 s: never). Catches what
    /// `healthy_deadline` cannot: copies replaced again and again, or a
    /// slot no node can take.
    #[serde(
        default = "default_progress_deadline",
        with = "crate::job::humantime_serde_str"
    )]
    pub progress_deadline: Duration,
    /// Slots moved first, all at once (beyond `max_parallel`, as Nomad
    /// places its canaries), then the update waits for `shoal deployment
    /// promote` (default 0: no canaries). Not for a job's first version.
    #[serde(default)]
    pub canary: u32,
    /// When the update fails, write the last good version back (default
    /// false). A revert is never reverted, and a newer submission wins.
    #[serde(default)]
    pub auto_revert: bool,
}

fn default_progress_deadline() -> Duration {
    Duration::from_secs(600)
}

fn default_healthy_deadline() -> Duration {
    Duration::from_secs(300)
}

/// Longest `healthy_deadline`.
pub const HEALTHY_DEADLINE_MAX: Duration = Duration::from_secs(24 * 3600);

fn default_max_parallel() -> u32 {
    1
}

/// Longest `min_healthy_time`.
pub const MIN_HEALTHY_MAX: Duration = Duration::from_secs(3600);

impl Default for UpdateSpec {
    fn default() -> Self {
        UpdateSpec {
            max_parallel: default_max_parallel(),
            order: Order::default(),
            min_healthy_time: Duration::ZERO,
            healthy_deadline: default_healthy_deadline(),
            progress_deadline: default_progress_deadline(),
            canary: 0,
            auto_revert: false,
        }
    }
}

impl UpdateSpec {
    /// Whether these are the defaults (then not written out).
    pub fn is_default(&self) -> bool {
        *self == UpdateSpec::default()
    }

    /// The problem with these settings, if any: (field, message).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.max_parallel == 0 || self.max_parallel > crate::job::REPLICAS_MAX {
            return Some((
                "max_parallel",
                format!(
                    "must be between 1 and {}, not {}",
                    crate::job::REPLICAS_MAX,
                    self.max_parallel
                ),
            ));
        }
        if self.min_healthy_time > MIN_HEALTHY_MAX {
            return Some((
                "min_healthy_time",
                format!("at most {}s", MIN_HEALTHY_MAX.as_secs()),
            ));
        }
        if self.healthy_deadline <= self.min_healthy_time
            || self.healthy_deadline > HEALTHY_DEADLINE_MAX
        {
            return Some((
                "healthy_deadline",
                format!(
                    "must be longer than min_healthy_time and at most {}s",
                    HEALTHY_DEADLINE_MAX.as_secs()
                ),
            ));
        }
        // No rule against the other durations: records written before
        // the field existed carry its default, and must still validate
        // (found in review: one with min_healthy_time >= 10 min was
        // dropped at start). `effective_progress_deadline` reconciles them.
        if self.progress_deadline > HEALTHY_DEADLINE_MAX {
            return Some((
                "progress_deadline",
                format!("at most {}s (0s: none)", HEALTHY_DEADLINE_MAX.as_secs()),
            ));
        }
        if self.canary > crate::job::REPLICAS_MAX {
            return Some(("canary", format!("at most {}", crate::job::REPLICAS_MAX)));
        }
        None
    }

    /// The progress deadline in force: none for 0 s, else at least
    /// `healthy_deadline` (a copy still within its own deadline does not
    /// fail the update).
    pub fn effective_progress_deadline(&self) -> Duration {
        if self.progress_deadline.is_zero() {
            Duration::ZERO
        } else {
            self.progress_deadline.max(self.healthy_deadline)
        }
    }

    /// The window before promotion: the canary slots (the first
    /// `canary`) that are not ready, all at once.
    pub fn canary_window(&self, replicas: u32, ready: impl Fn(u32) -> bool) -> Vec<u32> {
        (0..self.canary.min(replicas))
            .filter(|s| !ready(*s))
            .collect()
    }
}

/// The window: the first `max_parallel` slots below `replicas`, in
/// order, that are not `ready`.
pub fn window(replicas: u32, max_parallel: u32, ready: impl Fn(u32) -> bool) -> Vec<u32> {
    (0..replicas)
        .filter(|s| !ready(*s))
        .take(max_parallel as usize)
        .collect()
}

/// The window of a stop-first update among the `candidates` (every slot,
/// or the canary slots before promotion), with room for `room` slots down
/// at once (`max_parallel`, or `canary`): the slots not `ready` that no
/// copy serves (of any version: `serving`), anywhere, count first, since
/// they are already down, and the candidates among them are in the window;
/// then the first not-ready candidates that still serve, in slot order,
/// fill what room is left. Without the first part, a version written while
/// an older update had slots down let `room` more stop (passing fell to
/// N - 2 x max_parallel).
pub fn stop_first_window(
    replicas: u32,
    candidates: std::ops::Range<u32>,
    room: u32,
    ready: impl Fn(u32) -> bool,
    serving: impl Fn(u32) -> bool,
) -> Vec<u32> {
    let (down, up): (Vec<u32>, Vec<u32>) = (0..replicas)
        .filter(|s| !ready(*s))
        .partition(|s| !serving(*s));
    let left = (room as usize).saturating_sub(down.len());
    let mut w: Vec<u32> = down
        .into_iter()
        .filter(|s| candidates.contains(s))
        .chain(up.into_iter().filter(|s| candidates.contains(s)).take(left))
        .collect();
    w.sort_unstable();
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_window_is_the_first_slots_not_ready() {
        assert_eq!(window(6, 2, |s| s < 2), vec![2, 3]);
        assert_eq!(window(6, 2, |s| s != 4), vec![4]);
        assert_eq!(window(3, 5, |_| false), vec![0, 1, 2]);
        assert!(window(3, 1, |_| true).is_empty());
    }

    #[test]
    fn deadlines_and_canaries_are_bounded() {
        let ok = UpdateSpec::default();
        assert_eq!(ok.problem(), None);
        let none = UpdateSpec {
            progress_deadline: Duration::ZERO,
            ..UpdateSpec::default()
        };
        assert_eq!(none.problem(), None, "0 s: no progress deadline");
        // Shorter than the other deadlines: valid (records written before
        // the field existed), in force as healthy_deadline.
        let short = UpdateSpec {
            min_healthy_time: Duration::from_secs(900),
            healthy_deadline: Duration::from_secs(1800),
            ..UpdateSpec::default()
        };
        assert_eq!(short.problem(), None);
        assert_eq!(
            short.effective_progress_deadline(),
            Duration::from_secs(1800)
        );
        let long = UpdateSpec {
            progress_deadline: HEALTHY_DEADLINE_MAX + Duration::from_secs(1),
            ..UpdateSpec::default()
        };
        assert_eq!(long.problem().map(|p| p.0), Some("progress_deadline"));
        let many = UpdateSpec {
            canary: crate::job::REPLICAS_MAX + 1,
            ..UpdateSpec::default()
        };
        assert_eq!(many.problem().map(|p| p.0), Some("canary"));
        // Before promotion: the canary slots not ready, all at once.
        let c = UpdateSpec {
            canary: 3,
            ..UpdateSpec::default()
        };
        assert_eq!(c.canary_window(6, |s| s == 1), vec![0, 2]);
        assert_eq!(c.canary_window(2, |_| false), vec![0, 1]);
    }

    #[test]
    fn a_stop_first_window_counts_the_slots_already_down() {
        // Slot 4 is down (an older update stopped it): one more may stop.
        assert_eq!(
            stop_first_window(6, 0..6, 2, |_| false, |s| s != 4),
            vec![0, 4]
        );
        // Two down with max_parallel 2: nothing serving stops.
        assert_eq!(
            stop_first_window(6, 0..6, 2, |_| false, |s| s != 4 && s != 5),
            vec![4, 5]
        );
        // More down than max_parallel: all of them, and nothing else.
        assert_eq!(
            stop_first_window(4, 0..4, 1, |s| s == 0, |s| s == 3),
            vec![1, 2]
        );
        // Nothing down: the slot-order window.
        assert_eq!(
            stop_first_window(6, 0..6, 2, |s| s < 2, |_| true),
            window(6, 2, |s| s < 2)
        );
        // Canaries 0 and 1, slot 4 down outside them: one canary moves.
        assert_eq!(
            stop_first_window(6, 0..2, 2, |_| false, |s| s != 4),
            vec![0]
        );
        // Slot 1 down among them: both canaries are in, nothing else stops.
        assert_eq!(
            stop_first_window(6, 0..2, 2, |_| false, |s| s != 1),
            vec![0, 1]
        );
    }

    proptest! {
        /// Serving slots a stop-first window lets stop, plus the slots
        /// already down, never exceed max_parallel; and a view that sees a
        /// subset of the ready slots lets no serving slot stop that is
        /// truly not ready and outside the true window.
        #[test]
        fn a_stop_first_window_keeps_replicas_minus_max_parallel(
            ready in proptest::collection::vec(any::<bool>(), 1..40),
            serving in proptest::collection::vec(any::<bool>(), 40),
            seen in proptest::collection::vec(any::<bool>(), 40),
            mp in 1u32..6,
        ) {
            let n = ready.len() as u32;
            let truly = |s: u32| ready[s as usize];
            let serves = |s: u32| ready[s as usize] || serving[s as usize];
            let w = stop_first_window(n, 0..n, mp, truly, serves);
            let down = (0..n).filter(|s| !serves(*s)).count();
            let stopping = w.iter().filter(|s| serves(**s) && !truly(**s)).count();
            prop_assert!(stopping + down <= (mp as usize).max(down));
            let stale = |s: u32| ready[s as usize] && seen[s as usize];
            for s in stop_first_window(n, 0..n, mp, stale, serves) {
                prop_assert!(!serves(s) || truly(s) || w.contains(&s), "slot {s}");
            }
        }

        /// A view that sees a subset of the ready slots never lets a slot
        /// move that is truly not ready and outside the true window.
        #[test]
        fn a_stale_view_moves_nothing_beyond_the_true_window(
            ready in proptest::collection::vec(any::<bool>(), 1..40),
            seen in proptest::collection::vec(any::<bool>(), 40),
            mp in 1u32..6,
        ) {
            let n = ready.len() as u32;
            let truly = |s: u32| ready[s as usize];
            // The stale view: ready only where truly ready and seen.
            let stale = |s: u32| ready[s as usize] && seen[s as usize];
            let true_window = window(n, mp, truly);
            for s in window(n, mp, stale) {
                prop_assert!(truly(s) || true_window.contains(&s), "slot {s}");
            }
        }
    }
}
