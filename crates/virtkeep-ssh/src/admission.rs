//! Getting a connection admitted by a busy sshd.
//!
//! sshd counts connections that have not finished authenticating against its
//! `MaxStartups` (OpenSSH's default `10:30:100`: beyond 10 it drops new ones at
//! random, by closing them before its banner). One backup job opens a control
//! connection and up to four data connections at once, and several jobs may run
//! against one host, so this process bounds its own concurrent handshakes per host
//! ([`HandshakeSlots`]) and retries a connection sshd dropped early ([`Retry`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default of [`crate::HostTarget::max_handshakes`]: well under OpenSSH's default
/// `MaxStartups` start of 10, and enough for a job's control and data connections.
pub const DEFAULT_MAX_HANDSHAKES: usize = 4;
/// Default of [`crate::HostTarget::connect_retries`].
pub const DEFAULT_CONNECT_RETRIES: u32 = 6;

/// First backoff after an early drop; doubled per retry up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Per host:port (and limit) semaphores of this process, each held from the TCP
/// connect to the end of authentication.
pub(crate) struct HandshakeSlots;

impl HandshakeSlots {
    /// Waits for a handshake slot of `host`:`port`; the slot is free again when the
    /// permit is dropped. Targets with different limits get different semaphores (a
    /// limit is a property of the configuration, which names one per host).
    pub(crate) async fn acquire(host: &str, port: u16, limit: usize) -> OwnedSemaphorePermit {
        type Map = HashMap<(String, u16, usize), Arc<Semaphore>>;
        static SLOTS: OnceLock<Mutex<Map>> = OnceLock::new();
        let limit = limit.max(1);
        let sem = SLOTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((host.to_owned(), port, limit))
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone();
        // The semaphore is never closed, so acquiring cannot fail.
        sem.acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("handshake semaphores are never closed"))
    }
}

/// Steps one connect had before it waited for slots or retried (TCP connect, SSH
/// handshake, authentication, `connect_timeout` each): the whole connect gets as long.
const CONNECT_STEPS: u32 = 3;

/// One deadline for a whole connect: waiting for a handshake slot, every attempt and
/// authentication share it, each step also bounded by `connect_timeout`, so a busy
/// host or retries never stretch a connect past what one attempt was allowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectDeadline {
    at: Instant,
    step: Duration,
}

impl ConnectDeadline {
    /// From now, with `step` (`connect_timeout`) per step.
    pub(crate) fn new(step: Duration) -> ConnectDeadline {
        ConnectDeadline::starting(Instant::now(), step)
    }

    fn starting(now: Instant, step: Duration) -> ConnectDeadline {
        // A timeout too large for the clock is no deadline worth keeping apart.
        let at = now
            .checked_add(step.saturating_mul(CONNECT_STEPS))
            .or_else(|| now.checked_add(Duration::from_secs(1 << 32)))
            .unwrap_or(now);
        ConnectDeadline { at, step }
    }

    /// The end of the whole connect.
    pub(crate) fn at(&self) -> Instant {
        self.at
    }

    /// What is left of the whole connect.
    pub(crate) fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// What the step starting now may take: its own limit, cut to what is left.
    pub(crate) fn step(&self) -> Duration {
        self.step_at(Instant::now())
    }

    fn step_at(&self, now: Instant) -> Duration {
        self.step.min(self.at.saturating_duration_since(now))
    }
}

/// Whether a failed handshake looks like sshd shedding load: the connection was
/// closed or reset before a host key was seen. A refused TCP connect, a timeout, a
/// host-key verdict and an authentication failure are never retried.
pub(crate) fn is_early_drop(e: &russh::Error) -> bool {
    use std::io::ErrorKind as K;
    match e {
        russh::Error::Disconnect | russh::Error::HUP => true,
        russh::Error::IO(io) => matches!(
            io.kind(),
            K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe
        ),
        _ => false,
    }
}

/// Bounded, jittered backoff for early drops, within the connect deadline.
pub(crate) struct Retry {
    until: Instant,
    left: u32,
    next: Duration,
}

impl Retry {
    /// `retries` at most, none starting at or after `until`.
    pub(crate) fn new(retries: u32, until: Instant) -> Retry {
        Retry {
            until,
            left: retries,
            next: FIRST_BACKOFF,
        }
    }

    /// Sleeps before the next attempt; false when no retry is left or the next
    /// attempt would start after the deadline.
    pub(crate) async fn wait(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        // Full jitter over [next/2, next): parallel clients dropped together do not
        // come back together.
        let half = self.next / 2;
        let jitter = half.mul_f64(random_fraction());
        let pause = half + jitter;
        if Instant::now() + pause >= self.until {
            return false;
        }
        self.left -= 1;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        tokio::time::sleep(pause).await;
        true
    }
}

/// A number in [0, 1), different per call (no cryptographic quality needed).
fn random_fraction() -> f64 {
    let bits = RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retry_stops_at_its_count_and_its_deadline() {
        let mut r = Retry::new(2, Instant::now() + Duration::from_secs(10));
        assert!(r.wait().await);
        assert!(r.wait().await);
        assert!(!r.wait().await, "only two retries");
        let mut r = Retry::new(100, Instant::now() + Duration::from_millis(1));
        assert!(!r.wait().await, "no retry past the deadline");
    }

    /// One deadline for the whole connect: each step gets `connect_timeout` while
    /// enough is left, then only what is left, then nothing; the whole is three steps.
    #[test]
    fn a_connect_has_one_deadline() {
        let step = Duration::from_secs(10);
        let t0 = Instant::now();
        let d = ConnectDeadline::starting(t0, step);
        assert_eq!(d.at(), t0 + Duration::from_secs(30));
        assert_eq!(d.step_at(t0), step);
        assert_eq!(d.step_at(t0 + Duration::from_secs(20)), step);
        assert_eq!(
            d.step_at(t0 + Duration::from_secs(25)),
            Duration::from_secs(5),
            "a late attempt gets only the time left"
        );
        assert_eq!(d.step_at(t0 + Duration::from_secs(30)), Duration::ZERO);
        assert_eq!(d.step_at(t0 + Duration::from_secs(99)), Duration::ZERO);
        // A timeout beyond the clock's range still makes a deadline (no panic).
        let d = ConnectDeadline::starting(t0, Duration::MAX);
        assert!(d.at() > t0 + Duration::from_secs(1 << 31));
    }

    #[test]
    fn only_early_closes_count_as_drops() {
        use std::io::{Error, ErrorKind};
        assert!(is_early_drop(&russh::Error::Disconnect));
        assert!(is_early_drop(&russh::Error::IO(Error::from(
            ErrorKind::ConnectionReset
        ))));
        assert!(!is_early_drop(&russh::Error::IO(Error::from(
            ErrorKind::ConnectionRefused
        ))));
        assert!(!is_early_drop(&russh::Error::NotAuthenticated));
    }
}
