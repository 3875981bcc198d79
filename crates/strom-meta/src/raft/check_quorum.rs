//! Check quorum: a metadata leader that has not been acknowledged by a majority of the voters
//! for a while stops acting as the active controller (as KRaft's leader resigns after 1.5 fetch
//! timeouts without fetches from a majority, KAFKA-15489). openraft keeps such a leader in
//! office until it hears of a newer term, which a node cut off from the others never does: it
//! would go on answering DescribeQuorum and Metadata as the controller and taking controller
//! requests it can never commit, while the majority has elected another. The Raft state is left
//! alone (no new term, so nothing to disrupt when the network heals); only the node's own
//! claim is withdrawn until a majority acknowledges it again or a newer leader replaces it.

use std::time::{Duration, Instant};

pub(crate) struct CheckQuorum {
    node_id: u64,
    window: Duration,
    /// The term this node leads and since when it has (for a leader no majority has
    /// acknowledged yet in that term). Kept per term: the watcher may not see every state, and
    /// a node that lost and regained the leadership between two looks starts afresh.
    leader_since: Option<(u64, Instant)>,
    lost: bool,
}

impl CheckQuorum {
    /// `window`: how long a leader may go without a majority's acknowledgement.
    pub(crate) fn new(node_id: u64, window: Duration) -> Self {
        CheckQuorum {
            node_id,
            window,
            leader_since: None,
            lost: false,
        }
    }

    /// Whether the leader has lost its majority, given the term this node leads (None: it is
    /// not the Raft leader), how many voters there are, and how long ago a majority last
    /// acknowledged it (None: not yet in this term).
    pub(crate) fn lost(
        &mut self,
        leader_term: Option<u64>,
        voters: usize,
        since_ack: Option<Duration>,
    ) -> bool {
        self.lost_at(Instant::now(), leader_term, voters, since_ack)
    }

    pub(crate) fn lost_at(
        &mut self,
        now: Instant,
        leader_term: Option<u64>,
        voters: usize,
        since_ack: Option<Duration>,
    ) -> bool {
        let Some(term) = leader_term else {
            self.leader_since = None;
            self.set(false, None);
            return false;
        };
        let since = match self.leader_since {
            Some((t, since)) if t == term => since,
            _ => {
                self.leader_since = Some((term, now));
                now
            }
        };
        // A single voter is its own majority.
        if voters <= 1 {
            self.set(false, None);
            return false;
        }
        let silent = since_ack.unwrap_or_else(|| now.saturating_duration_since(since));
        let lost = silent > self.window;
        self.set(lost, Some(silent));
        lost
    }

    fn set(&mut self, lost: bool, silent: Option<Duration>) {
        if lost == self.lost {
            return;
        }
        self.lost = lost;
        if lost {
            tracing::warn!(
                node_id = self.node_id,
                silent_ms = silent.map(|d| d.as_millis() as u64),
                window_ms = self.window.as_millis() as u64,
                "metadata leader not acknowledged by a majority of the voters: no longer acting as the active controller"
            );
        } else {
            tracing::info!(
                node_id = self.node_id,
                "metadata leader acknowledged by a majority again, or no longer leader"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(900);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_leader_resigns_only_after_the_window_without_a_majority_and_returns_when_acked() {
        let mut c = CheckQuorum::new(1, W);
        let t0 = Instant::now();
        assert!(!c.lost_at(t0, Some(1), 3, Some(ms(100))));
        assert!(!c.lost_at(t0, Some(1), 3, Some(ms(900))));
        assert!(c.lost_at(t0, Some(1), 3, Some(ms(901))));
        assert!(c.lost_at(t0, Some(1), 3, Some(ms(5000))));
        // A majority acknowledges it again.
        assert!(!c.lost_at(t0, Some(1), 3, Some(ms(10))));
    }

    #[test]
    fn a_new_leader_that_no_majority_ever_acknowledged_resigns_after_the_window() {
        let mut c = CheckQuorum::new(1, W);
        let t0 = Instant::now();
        assert!(!c.lost_at(t0, Some(1), 3, None));
        assert!(!c.lost_at(t0 + ms(800), Some(1), 3, None));
        assert!(c.lost_at(t0 + ms(1000), Some(1), 3, None));
        // Stepping down and being elected again restarts the clock.
        assert!(!c.lost_at(t0 + ms(1100), None, 3, None));
        assert!(!c.lost_at(t0 + ms(1200), Some(1), 3, None));
        assert!(!c.lost_at(t0 + ms(2000), Some(1), 3, None));
        assert!(c.lost_at(t0 + ms(2200), Some(1), 3, None));
    }

    #[test]
    fn a_single_voter_and_a_follower_never_resign() {
        let mut c = CheckQuorum::new(1, W);
        let t0 = Instant::now();
        assert!(!c.lost_at(t0, Some(1), 1, None));
        assert!(!c.lost_at(t0 + ms(60_000), Some(1), 1, None));
        assert!(!c.lost_at(t0 + ms(60_000), None, 3, Some(ms(60_000))));
    }

    #[test]
    fn a_new_term_restarts_the_clock_even_if_no_step_down_was_seen() {
        let mut c = CheckQuorum::new(1, W);
        let t0 = Instant::now();
        assert!(!c.lost_at(t0, Some(1), 3, None));
        // Term 2 won between two looks: nothing acknowledged it yet, but it is new.
        assert!(!c.lost_at(t0 + ms(2000), Some(2), 3, None));
        assert!(!c.lost_at(t0 + ms(2800), Some(2), 3, None));
        assert!(c.lost_at(t0 + ms(3000), Some(2), 3, None));
    }
}
