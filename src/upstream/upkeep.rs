//! What one maintenance pass over a group does, decided on plain values: which connections to
//! recycle before their credentials expire, which to heartbeat, whether the load has gone
//! enough to let one go, and whether it is time to move one between addresses. The
//! maintenance task (`maintenance`) takes the snapshot, reads the clocks and acts on the list.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use super::addresses::crowded;

/// At most one connection moved between addresses per group this often.
pub(super) const REBALANCE_EVERY: Duration = Duration::from_secs(5);

/// When a group's periodic work last ran, and the request count it last saw.
#[derive(Debug, Clone)]
pub(super) struct Rhythm {
    last_heartbeat: Instant,
    window_start: Instant,
    window_sent: u64,
    last_rebalance: Instant,
}

impl Rhythm {
    /// Everything just done at `now`: the first heartbeat, shrink and rebalance come one
    /// interval later.
    pub(super) fn new(now: Instant) -> Rhythm {
        Rhythm {
            last_heartbeat: now,
            window_start: now,
            window_sent: 0,
            last_rebalance: now,
        }
    }
}

/// One connection of the group as the pass sees it; `conn` is what the actions name.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnView<C> {
    pub(super) conn: C,
    pub(super) ready: bool,
    pub(super) in_flight: usize,
    /// Requests sent on it since it opened.
    pub(super) sent: u64,
    /// When the credentials that signed it expire, if they do.
    pub(super) credentials_expiry: Option<SystemTime>,
}

/// The settings a pass decides by.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) heartbeat_interval: Duration,
    pub(super) recycle_before_expiry: Duration,
    pub(super) shrink_window: Duration,
    /// Requests per second one connection may carry (0 = unlimited).
    pub(super) max_rate_per_connection: u32,
    /// In-flight depth at which a shared connection is worth splitting
    /// (`pool::shared_grow_at`).
    pub(super) shared_grow_at: usize,
    /// Ready connections the group keeps however idle it is.
    pub(super) min_ready: usize,
}

/// Something the pass found to do, done in the order returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action<C> {
    /// Drain it and open a replacement: its credentials expire within the margin.
    Recycle(C),
    /// Send it an OPTIONS; it is closed if no answer comes within the request timeout.
    Heartbeat(C),
    /// Drain it: the group's load fits in one connection fewer.
    Shrink(C),
    /// Move one connection off an address crowded relative to the others, if one is.
    Rebalance,
}

/// The pass at `now` (`wall` for credential expiry) over the group's connections, in the order
/// the maintenance task acts. A connection drained by an earlier action is no longer ready for
/// the later ones, as it would be once the task has drained it. `rhythm` records what ran.
pub(super) fn plan<C: Copy>(
    conns: &[ConnView<C>],
    limits: &Limits,
    now: Instant,
    wall: SystemTime,
    rhythm: &mut Rhythm,
) -> Vec<Action<C>> {
    let mut actions = Vec::new();
    let mut ready: Vec<bool> = conns.iter().map(|c| c.ready).collect();
    // Re-sign before the credentials behind a connection expire.
    for (i, c) in conns.iter().enumerate() {
        if ready[i] && expires_soon(c.credentials_expiry, wall, limits.recycle_before_expiry) {
            actions.push(Action::Recycle(c.conn));
            ready[i] = false;
        }
    }
    if now.saturating_duration_since(rhythm.last_heartbeat) >= limits.heartbeat_interval {
        rhythm.last_heartbeat = now;
        let due = conns.iter().zip(&ready).filter(|(_, r)| **r);
        actions.extend(due.map(|(c, _)| Action::Heartbeat(c.conn)));
    }
    let sent: u64 = conns.iter().map(|c| c.sent).sum();
    let window = now.saturating_duration_since(rhythm.window_start);
    if window >= limits.shrink_window {
        let rate = sent.saturating_sub(rhythm.window_sent) as f64 / window.as_secs_f64();
        let on_ready: Vec<&ConnView<C>> = conns
            .iter()
            .zip(&ready)
            .filter(|(_, r)| **r)
            .map(|(c, _)| c)
            .collect();
        let in_flight: usize = on_ready.iter().map(|c| c.in_flight).sum();
        let fits = fits_in_one_fewer(on_ready.len(), rate, in_flight, limits);
        if on_ready.len() > limits.min_ready && fits {
            if let Some(c) = on_ready.iter().min_by_key(|c| c.in_flight) {
                actions.push(Action::Shrink(c.conn));
            }
        }
        rhythm.window_start = now;
        rhythm.window_sent = sent;
    }
    if now.saturating_duration_since(rhythm.last_rebalance) >= REBALANCE_EVERY {
        rhythm.last_rebalance = now;
        actions.push(Action::Rebalance);
    }
    actions
}

/// Whether credentials expiring at `expiry` (if they do) are past, or due within `margin`.
fn expires_soon(expiry: Option<SystemTime>, wall: SystemTime, margin: Duration) -> bool {
    expiry.is_some_and(|exp| exp.duration_since(wall).map_or(true, |left| left < margin))
}

/// Whether `ready` connections' load, `rate` requests/s over the last window and `in_flight`
/// now, would fit in one connection fewer at half the budget.
fn fits_in_one_fewer(ready: usize, rate: f64, in_flight: usize, limits: &Limits) -> bool {
    let budget = f64::from(limits.max_rate_per_connection);
    let fewer = ready.saturating_sub(1);
    let fits_rate = if budget > 0.0 {
        rate < fewer as f64 * budget * 0.5
    } else {
        rate == 0.0
    };
    // Growth also follows queue depth, so shrinking must leave room for it: otherwise a slow
    // but deep workload would open and close a connection every window.
    fits_rate && in_flight <= fewer * limits.shared_grow_at / 2
}

/// Whether a group must open a connection to get back to its minimum: decided after the pass's
/// actions, on the counts as they then are (recycling and rebalancing may have started
/// connections, or not, as back-off and limits allow).
pub(super) fn below_minimum(ready: usize, connecting: usize, min_ready: usize) -> bool {
    ready + connecting < min_ready
}

/// Which of the connections on addresses `on` (one each) to move, so that they spread over the
/// `settled` addresses (see `addresses::crowded`): the first on the crowded address.
pub(super) fn connection_to_move(on: &[SocketAddr], settled: &[SocketAddr]) -> Option<usize> {
    let from = crowded(on, settled)?;
    on.iter().position(|a| *a == from)
}

/// Whether a heartbeat's outcome (the timeout around the wait for its answer) shows the
/// connection silent: no answer in time, or the request lost with the connection.
pub(super) fn heartbeat_unanswered<T, E, F>(outcome: &Result<Result<T, E>, F>) -> bool {
    !matches!(outcome, Ok(Ok(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT: Duration = Duration::from_secs(30);
    const WINDOW: Duration = Duration::from_secs(30);
    const MARGIN: Duration = Duration::from_secs(300);

    fn limits(min_ready: usize) -> Limits {
        Limits {
            heartbeat_interval: HEARTBEAT,
            recycle_before_expiry: MARGIN,
            shrink_window: WINDOW,
            max_rate_per_connection: 1000,
            shared_grow_at: 64,
            min_ready,
        }
    }

    fn conn(id: u32) -> ConnView<u32> {
        ConnView {
            conn: id,
            ready: true,
            in_flight: 0,
            sent: 0,
            credentials_expiry: None,
        }
    }

    /// A pass `after` the rhythm's start, with the wall clock at `wall`.
    fn pass_at(
        conns: &[ConnView<u32>],
        limits: &Limits,
        rhythm: &mut Rhythm,
        t0: Instant,
        after: Duration,
        wall: SystemTime,
    ) -> Vec<Action<u32>> {
        plan(conns, limits, t0 + after, wall, rhythm)
    }

    #[test]
    fn a_healthy_group_between_deadlines_needs_nothing() {
        let t0 = Instant::now();
        let mut rhythm = Rhythm::new(t0);
        let mut conns = [conn(1), conn(2), conn(3)];
        conns[0].in_flight = 40;
        conns[1].credentials_expiry = Some(SystemTime::now() + Duration::from_secs(3600));
        let actions = pass_at(
            &conns,
            &limits(2),
            &mut rhythm,
            t0,
            Duration::from_millis(500),
            SystemTime::now(),
        );
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn heartbeats_go_to_ready_connections_once_per_interval() {
        let t0 = Instant::now();
        let mut rhythm = Rhythm::new(t0);
        let mut conns = [conn(1), conn(2), conn(3)];
        conns[1].ready = false; // draining: left alone
        let wall = SystemTime::now();
        let l = limits(3);
        let early = pass_at(&conns, &l, &mut rhythm, t0, HEARTBEAT / 2, wall);
        assert!(!early.iter().any(|a| matches!(a, Action::Heartbeat(_))));
        let due = pass_at(&conns, &l, &mut rhythm, t0, HEARTBEAT, wall);
        let beaten: Vec<_> = due
            .iter()
            .filter_map(|a| match a {
                Action::Heartbeat(c) => Some(*c),
                _ => None,
            })
            .collect();
        assert_eq!(beaten, [1, 3]);
        let next = pass_at(&conns, &l, &mut rhythm, t0, HEARTBEAT + HEARTBEAT / 2, wall);
        assert!(
            !next.iter().any(|a| matches!(a, Action::Heartbeat(_))),
            "the interval restarts at the heartbeat"
        );
    }

    #[test]
    fn connections_are_recycled_before_their_credentials_expire() {
        let t0 = Instant::now();
        let mut rhythm = Rhythm::new(t0);
        let wall = SystemTime::now();
        let mut conns = [conn(1), conn(2), conn(3), conn(4), conn(5)];
        conns[0].credentials_expiry = Some(wall + MARGIN - Duration::from_secs(1));
        conns[1].credentials_expiry = Some(wall + MARGIN + Duration::from_secs(60));
        conns[2].credentials_expiry = Some(wall - Duration::from_secs(1)); // already expired
        conns[3].credentials_expiry = Some(wall); // nothing left
        conns[4].credentials_expiry = Some(wall - Duration::from_secs(1));
        conns[4].ready = false; // already draining
        let actions = pass_at(&conns, &limits(1), &mut rhythm, t0, HEARTBEAT, wall);
        let recycled: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Recycle(c) => Some(*c),
                _ => None,
            })
            .collect();
        assert_eq!(recycled, [1, 3, 4]);
        // Recycled connections are draining: no heartbeat for them in the same pass.
        let beaten: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Heartbeat(c) => Some(*c),
                _ => None,
            })
            .collect();
        assert_eq!(beaten, [2]);
        assert!(matches!(actions[0], Action::Recycle(1)), "{actions:?}");
    }

    #[test]
    fn an_idle_group_shrinks_one_connection_per_window_down_to_its_minimum() {
        let t0 = Instant::now();
        let mut rhythm = Rhythm::new(t0);
        let wall = SystemTime::now();
        let l = limits(2);
        let mut conns = [conn(1), conn(2), conn(3), conn(4)];
        for (c, depth) in conns.iter_mut().zip([3, 1, 2, 1]) {
            c.in_flight = depth;
        }
        let mut shrunk = Vec::new();
        for window in 1..=4u32 {
            let actions = pass_at(&conns, &l, &mut rhythm, t0, WINDOW * window, wall);
            for a in actions {
                if let Action::Shrink(id) = a {
                    shrunk.push(id);
                    conns[id as usize - 1].ready = false;
                }
            }
        }
        // The least busy first (the first of equals), one per window, never below two.
        assert_eq!(shrunk, [2, 4]);
    }

    #[test]
    fn a_group_whose_load_needs_every_connection_keeps_them() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let l = limits(1);
        let shrinks = |conns: &[ConnView<u32>], rhythm: &mut Rhythm, after: Duration| {
            pass_at(conns, &l, rhythm, t0, after, wall)
                .iter()
                .any(|a| matches!(a, Action::Shrink(_)))
        };
        // 3 connections; 2 would carry 1000 requests/s at half their budget: 1000/s is too many.
        let mut conns = [conn(1), conn(2), conn(3)];
        let mut rhythm = Rhythm::new(t0);
        conns[0].sent = 30_000; // 1000/s over the 30 s window
        assert!(!shrinks(&conns, &mut rhythm, WINDOW));
        conns[0].sent += 29_000; // under 1000/s over the next window
        assert!(shrinks(&conns, &mut rhythm, WINDOW * 2));
        // Deep queues need room to grow: 2 × 64 / 2 = 64 in flight fit, 65 do not.
        let mut conns = [conn(1), conn(2), conn(3)];
        conns[0].in_flight = 65;
        assert!(!shrinks(&conns, &mut Rhythm::new(t0), WINDOW));
        conns[0].in_flight = 64;
        assert!(shrinks(&conns, &mut Rhythm::new(t0), WINDOW));
        // Before the window is over, nothing is let go however idle.
        assert!(!shrinks(&conns, &mut Rhythm::new(t0), WINDOW / 2));
    }

    #[test]
    fn without_a_rate_budget_only_a_silent_window_shrinks() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let l = Limits {
            max_rate_per_connection: 0,
            ..limits(1)
        };
        let mut conns = [conn(1), conn(2)];
        conns[1].sent = 1;
        let shrinks = |conns: &[ConnView<u32>]| {
            pass_at(conns, &l, &mut Rhythm::new(t0), t0, WINDOW, wall)
                .iter()
                .any(|a| matches!(a, Action::Shrink(_)))
        };
        assert!(!shrinks(&conns));
        conns[1].sent = 0;
        assert!(shrinks(&conns));
    }

    #[test]
    fn the_window_restarts_from_the_requests_counted_at_its_end() {
        let t0 = Instant::now();
        let mut rhythm = Rhythm::new(t0);
        let wall = SystemTime::now();
        let mut conns = [conn(1), conn(2)];
        conns[0].sent = 500;
        let _ = pass_at(&conns, &limits(2), &mut rhythm, t0, WINDOW, wall);
        assert_eq!(rhythm.window_sent, 500);
        assert_eq!(rhythm.window_start, t0 + WINDOW);
        // Before the next window ends the count is not taken again.
        conns[0].sent = 900;
        let _ = pass_at(
            &conns,
            &limits(2),
            &mut rhythm,
            t0,
            WINDOW + WINDOW / 2,
            wall,
        );
        assert_eq!(rhythm.window_sent, 500);
    }

    #[test]
    fn rebalancing_comes_round_every_five_seconds() {
        let t0 = Instant::now();
        let mut rhythm = Rhythm::new(t0);
        let wall = SystemTime::now();
        let conns = [conn(1)];
        let l = limits(1);
        let at = |rhythm: &mut Rhythm, after| {
            pass_at(&conns, &l, rhythm, t0, after, wall).contains(&Action::Rebalance)
        };
        assert!(!at(&mut rhythm, REBALANCE_EVERY / 2));
        assert!(at(&mut rhythm, REBALANCE_EVERY));
        assert!(!at(&mut rhythm, REBALANCE_EVERY + REBALANCE_EVERY / 2));
        assert!(at(&mut rhythm, REBALANCE_EVERY * 2));
    }

    #[test]
    fn a_group_below_its_minimum_grows_counting_connects_under_way() {
        assert!(below_minimum(1, 0, 2));
        assert!(!below_minimum(1, 1, 2));
        assert!(!below_minimum(2, 0, 2));
        assert!(!below_minimum(0, 0, 0), "a keyspace group nobody holds");
    }

    #[test]
    fn the_connection_moved_is_one_on_the_crowded_address() {
        let addr = |last: u8| SocketAddr::from(([127, 0, 1, last], 9142));
        let settled = [addr(1), addr(2)];
        assert_eq!(
            connection_to_move(&[addr(2), addr(1), addr(1), addr(1)], &settled),
            Some(1)
        );
        assert_eq!(connection_to_move(&[addr(1), addr(2)], &settled), None);
    }

    #[test]
    fn a_heartbeat_without_an_answer_closes_the_connection() {
        type Outcome = Result<Result<(), &'static str>, &'static str>;
        let answered: Outcome = Ok(Ok(()));
        let timed_out: Outcome = Err("elapsed");
        let lost: Outcome = Ok(Err("connection closed"));
        assert!(!heartbeat_unanswered(&answered));
        assert!(heartbeat_unanswered(&timed_out));
        assert!(heartbeat_unanswered(&lost));
    }
}
