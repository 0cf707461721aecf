//! The failed-login throttle: at most [`MAX_FAILURES`] wrong tokens per client address
//! in a [`WINDOW`]; further logins from it are answered 429 until the window ends. The
//! table is bounded: when [`MAX_CLIENTS`] addresses are being counted, new ones share
//! one overflow counter (so a flood of addresses throttles itself, not the table size).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong tokens an address may send in a window.
pub const MAX_FAILURES: u32 = 5;
/// The window: counted from an address's first failure in it.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses counted at once.
pub const MAX_CLIENTS: usize = 4096;

/// Whom a failure counts against: an IPv4 address, an IPv6 /64 (one host usually holds
/// a whole /64), the unknown address (no peer address), or the overflow counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    V4(u32),
    V6Net(u64),
    Unknown,
    Overflow,
}

fn client(ip: Option<IpAddr>) -> Client {
    match ip.map(|ip| ip.to_canonical()) {
        Some(IpAddr::V4(a)) => Client::V4(u32::from(a)),
        Some(IpAddr::V6(a)) => Client::V6Net((u128::from(a) >> 64) as u64),
        None => Client::Unknown,
    }
}

#[derive(Debug, Clone, Copy)]
struct Count {
    failures: u32,
    since: Instant,
}

#[derive(Default)]
pub struct Throttle {
    map: Mutex<HashMap<Client, Count>>,
}

impl Throttle {
    /// Reserves one login attempt for the address: it counts as a failure until
    /// [`Throttle::succeeded`] gives it back. Checking and counting under one lock means
    /// parallel requests cannot all pass before their failures are counted.
    /// `Err(wait)` when the address must wait before it may try again.
    pub fn check(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let Ok(mut map) = self.map.lock() else {
            return Ok(());
        };
        let mut key = client(ip);
        if !map.contains_key(&key) && map.len() >= MAX_CLIENTS {
            map.retain(|_, c| now.saturating_duration_since(c.since) < WINDOW);
            if map.len() >= MAX_CLIENTS {
                key = Client::Overflow;
            }
        }
        let c = map.entry(key).or_insert(Count {
            failures: 0,
            since: now,
        });
        let elapsed = now.saturating_duration_since(c.since);
        if elapsed >= WINDOW {
            *c = Count {
                failures: 0,
                since: now,
            };
        } else if c.failures >= MAX_FAILURES {
            return Err(WINDOW - elapsed);
        }
        c.failures = c.failures.saturating_add(1);
        Ok(())
    }

    /// The address logged in: the attempt reserved by [`Throttle::check`] is given
    /// back. Earlier failures stay counted (one valid token must not let a client
    /// keep guessing others).
    pub fn succeeded(&self, ip: Option<IpAddr>) {
        if let Ok(mut map) = self.map.lock()
            && let Some(c) = map.get_mut(&client(ip))
        {
            c.failures = c.failures.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("address"))
    }

    #[test]
    fn an_address_is_throttled_after_its_failures_and_only_it() {
        let t = Throttle::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for i in 0..MAX_FAILURES {
            // Each check reserves the attempt: a wrong token needs nothing more.
            assert!(t.check(a, t0).is_ok(), "try {i}");
        }
        let wait = t
            .check(a, t0 + Duration::from_secs(10))
            .expect_err("throttled");
        assert_eq!(wait, WINDOW - Duration::from_secs(10));
        assert!(t.check(ip("192.0.2.8"), t0).is_ok(), "another address");
        assert!(t.check(a, t0 + WINDOW).is_ok(), "the window ended");
        assert!(t.check(a, t0 + WINDOW).is_ok(), "a new window, one failure");
        t.succeeded(a);
        assert_eq!(t.map.lock().expect("lock")[&client(a)].failures, 1);
    }

    /// Parallel logins: every check counts at once, before any answer is known.
    #[test]
    fn parallel_attempts_are_counted_when_checked() {
        let t = std::sync::Arc::new(Throttle::default());
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        let passed: u32 = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..20)
                .map(|_| sc.spawn(|| u32::from(t.check(a, t0).is_ok())))
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(passed, MAX_FAILURES);
    }

    /// A valid login gives back only its own attempt: the earlier wrong tokens stay
    /// counted, so one valid token does not reset the budget for guessing others.
    #[test]
    fn a_success_does_not_reset_the_failures() {
        let t = Throttle::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for _ in 0..MAX_FAILURES - 1 {
            assert!(t.check(a, t0).is_ok());
        }
        assert!(t.check(a, t0).is_ok(), "the valid login");
        t.succeeded(a);
        assert!(t.check(a, t0).is_ok(), "one more wrong token");
        assert!(t.check(a, t0).is_err(), "then throttled");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..MAX_FAILURES {
            let _ = t.check(ip(&format!("2001:db8::{i}")), t0);
        }
        assert!(t.check(ip("2001:db8::ffff"), t0).is_err(), "same /64");
        assert!(t.check(ip("2001:db8:0:1::1"), t0).is_ok(), "another /64");
        for _ in 0..MAX_FAILURES {
            let _ = t.check(ip("::ffff:192.0.2.9"), t0);
        }
        assert!(t.check(ip("192.0.2.9"), t0).is_err());
    }

    #[test]
    fn the_table_is_bounded_and_overflow_is_throttled_together() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..MAX_CLIENTS as u32 {
            let _ = t.check(Some(IpAddr::from(i.to_be_bytes())), t0);
        }
        for i in 0..MAX_FAILURES {
            let fresh = Some(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()));
            let _ = t.check(fresh, t0);
        }
        assert_eq!(t.map.lock().expect("lock").len(), MAX_CLIENTS + 1);
        let new = Some(IpAddr::from(0x0b00_0000u32.to_be_bytes()));
        assert!(
            t.check(new, t0).is_err(),
            "new addresses share the overflow count"
        );
        assert!(t.check(new, t0 + WINDOW).is_ok());
        assert_eq!(t.map.lock().expect("lock").len(), 1, "stale entries purged");
    }
}
