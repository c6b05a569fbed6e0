//! [`SchedulerConfig`]: every timing and bound of the scheduler core, with
//! the reason for each default.

use std::time::Duration;

use shoal_placement::PlacementConfig;

/// Settings of the scheduler core.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How often the shell calls [`crate::Scheduler::handle_timer`]. Restarts,
    /// retries and passes are due at this granularity.
    pub tick: Duration,
    /// Reconcile at most this often, however often things change: during a
    /// large submission views and instances change every few milliseconds,
    /// and a pass looks at every slot this node coordinates or holds.
    pub reconcile_interval_min: Duration,
    /// Reconcile at least this often even if nothing changed (a safety net:
    /// every change also marks the state dirty).
    pub reconcile_interval_max: Duration,
    /// A pass waits this many times the measured cost of the last one
    /// (reported by the shell), so that with many jobs passes take a
    /// bounded share of a core instead of crowding out the work they serve.
    pub pace: u32,
    /// A node that joined through seeds coordinates no placement for this
    /// long: until gossip has brought it the whole membership, its view
    /// would make it coordinator of jobs others coordinate. The same grace
    /// holds back copies found after a restart or a stall, and the
    /// published copies of a member back from the dead, until gossip shows
    /// whether the cluster replaced them.
    pub join_grace: Duration,
    /// A gap between timer calls longer than this means the process was
    /// stopped (SIGSTOP, a frozen VM): long enough for the failure detector
    /// (worst case about 3 s with a lone suspicion) to have declared it
    /// dead and the cluster to have replaced its copies.
    pub stall: Duration,
    /// How long a placement this node coordinates stays in flight (no new
    /// attempt for the slot) unless its copy shows in gossip first. Above
    /// gossip's propagation time (about a second), so that a copy that
    /// started is seen before its slot is placed again.
    pub placement_ttl: Duration,
    /// A winner refuses a start older than this (by the coordinator's
    /// clock and its own): the coordinator places the slot again once
    /// `placement_ttl` passed without seeing its copy, so a start delayed
    /// longer (a paused winner, a slow network) may be for a slot that ran
    /// elsewhere meanwhile. Below `placement_ttl` by more than twice the
    /// clock offset nodes tolerate (500 ms) plus a margin.
    pub start_max_age: Duration,
    /// A node's old copy stops because it is in a new version's update
    /// window only once the node has known that version this long: above
    /// gossip's propagation time (about a second), so that the node sees
    /// the slots an older update had down when the new version was
    /// written (they count against the new window).
    pub update_settle: Duration,
    /// How long the holder of a `partition = "never"` slot knows its
    /// claim before it starts the slot: beyond the time a claim takes to
    /// reach every node (about a round trip), so that two claims written
    /// at once meet before either holder starts, and the older loses.
    pub claim_settle: Duration,
    /// First wait before a slot that could not be placed (no node fits, or
    /// the winner refused) is tried again; it doubles per attempt.
    pub retry_min: Duration,
    /// Ceiling of that wait.
    pub retry_max: Duration,
    /// Wait for a candidate's bid (one round trip on a LAN is well under a
    /// millisecond; a candidate that does not answer in time bids with the
    /// load gossip last showed).
    pub bid_timeout: Duration,
    /// Wait for a winner to accept a start, for a page of anti-entropy and
    /// for logs from another node.
    pub call_timeout: Duration,
    /// An API write is answered once a peer has it on its disk too; if no
    /// peer confirms within this long, it is answered anyway (it is durable
    /// on the accepting node, and anti-entropy spreads it).
    pub replicate_timeout: Duration,
    /// An API write that comes before the node has caught up waits this
    /// long for it, then is refused (the node answers 503).
    pub held_api_timeout: Duration,
    /// Anti-entropy with one random peer this often (a missed push is
    /// repaired within about this long).
    pub sync_interval: Duration,
    /// Job records per anti-entropy answer or push (each answer is one
    /// frame, bounded at 4 MiB; a record is at most a 1 MiB job file, and
    /// typically under 2 KiB).
    pub sync_records_max: usize,
    /// Names per page of an anti-entropy digest (~150 bytes each: a page
    /// is ~750 KiB, well inside a frame), so catch-up works at any number
    /// of jobs.
    pub sync_digest_page: usize,
    /// Completions per anti-entropy page (~40 bytes each in the digest).
    pub sync_completions_page: usize,
    /// Grace between the stop signal and the kill.
    pub stop_grace: Duration,
    /// Placement rounds (bids in flight) this node runs at once.
    pub rounds_in_flight_max: usize,
    /// Nodes asked for a bid in one round; slots whose candidates were not
    /// asked are assigned on the load gossip shows.
    pub bidders_per_round_max: usize,
    /// Slots of one job placed in one round (a larger job is placed over
    /// several rounds, back to back).
    pub slots_per_round_max: usize,
    /// Records of other nodes' writes applied but not yet on disk, at most
    /// (beyond it, pushes are dropped and anti-entropy brings them later).
    pub writes_in_flight_max: usize,
    /// How often a node that has not caught up with a peer tries another.
    pub catch_up_retry: Duration,
    /// Placement settings (candidates per slot).
    pub placement: PlacementConfig,
    /// A peer's version more than this far ahead of this node's wall clock
    /// is refused (it would drag every node's clock into the future, and a
    /// newer write would then lose to it), and a node whose clock is this
    /// far off most of its peers' stops accepting writes until it is fixed.
    /// 500 ms: NTP keeps a LAN within a few ms; `start_max_age` leaves
    /// room for twice this.
    pub max_clock_offset: Duration,
    /// A stopped job's record (its tombstone) is forgotten, with its batch
    /// completions, this long after the stop: the job count shrinks again.
    /// Until then the tombstone stops an older write arriving late (from a
    /// node that was partitioned or down) from starting the job again; a
    /// node away for longer should come back with an empty data dir.
    pub job_gc_after: Duration,
    /// How often tombstones are collected.
    pub gc_interval: Duration,
    /// Most tombstones forgotten per collection (one store write).
    pub gc_batch_max: usize,
    /// Host ports this node chooses dynamic ports (`http = 0`) from,
    /// inclusive (`--port-range`; as Nomad's default, above the usual
    /// static ports and below Linux's ephemeral range, 32768-60999).
    pub port_range: (u16, u16),
    /// A remembered member down this long is no longer counted when this
    /// node decides whether it sees a majority (see [`crate::seen`]), and
    /// only by a side that sees a majority. As long as the membership keeps
    /// a dead member in the view: a shorter bound would let a side that
    /// lost members for a while shrink the count a minority is measured
    /// against while the lost side still runs.
    pub remember_dead: Duration,
    /// Act before catching up with a peer (a joining node places and starts
    /// at once). Never set outside tests: the simulator's tests set it to
    /// show the batch reruns the catch-up gate prevents.
    pub act_before_catch_up: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::lan()
    }
}

impl SchedulerConfig {
    /// Defaults for a LAN (and a single machine).
    pub fn lan() -> Self {
        SchedulerConfig {
            tick: Duration::from_millis(50),
            reconcile_interval_min: Duration::from_millis(100),
            reconcile_interval_max: Duration::from_secs(1),
            pace: 5,
            join_grace: Duration::from_secs(2),
            stall: Duration::from_secs(3),
            placement_ttl: Duration::from_secs(5),
            start_max_age: Duration::from_millis(3_500),
            update_settle: Duration::from_secs(2),
            claim_settle: Duration::from_secs(1),
            retry_min: Duration::from_millis(500),
            // Short enough that a slot blocked by something the coordinator
            // cannot see change (another job's port, a load) is placed soon
            // after it clears; a change to the job's own copies retries at
            // once anyway.
            retry_max: Duration::from_secs(10),
            bid_timeout: Duration::from_millis(500),
            call_timeout: Duration::from_secs(3),
            replicate_timeout: Duration::from_secs(2),
            held_api_timeout: Duration::from_secs(10),
            sync_interval: Duration::from_secs(1),
            sync_records_max: 500,
            sync_digest_page: 5_000,
            sync_completions_page: 10_000,
            stop_grace: Duration::from_secs(5),
            rounds_in_flight_max: 64,
            bidders_per_round_max: 256,
            slots_per_round_max: 10_000,
            writes_in_flight_max: 10_000,
            catch_up_retry: Duration::from_millis(250),
            placement: PlacementConfig::default(),
            max_clock_offset: Duration::from_millis(500),
            job_gc_after: Duration::from_secs(24 * 3600),
            gc_interval: Duration::from_secs(60),
            gc_batch_max: 1000,
            port_range: crate::ports::DEFAULT_RANGE,
            remember_dead: Duration::from_secs(15 * 60),
            act_before_catch_up: false,
        }
    }

    /// `max_clock_offset` in whole milliseconds.
    pub fn max_clock_offset_ms(&self) -> u64 {
        u64::try_from(self.max_clock_offset.as_millis()).unwrap_or(u64::MAX)
    }

    /// `job_gc_after` in whole milliseconds.
    pub fn job_gc_after_ms(&self) -> u64 {
        u64::try_from(self.job_gc_after.as_millis()).unwrap_or(u64::MAX)
    }

    /// Shorter graces for tests on one machine: joins, stalls and retries
    /// settle in a fraction of the LAN defaults.
    pub fn local_test() -> Self {
        SchedulerConfig {
            join_grace: Duration::from_millis(500),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            sync_interval: Duration::from_millis(250),
            gc_interval: Duration::from_secs(1),
            ..Self::lan()
        }
    }
}
