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
    /// `Err(wait)` when the address must wait before it may try again.
    pub fn check(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let Ok(map) = self.map.lock() else {
            return Ok(());
        };
        let key = client(ip);
        let count = map
            .get(&key)
            .or_else(|| (map.len() >= MAX_CLIENTS).then(|| map.get(&Client::Overflow))?);
        match count {
            Some(c) if c.failures >= MAX_FAILURES => {
                let elapsed = now.saturating_duration_since(c.since);
                if elapsed < WINDOW {
                    Err(WINDOW - elapsed)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// The address sent a wrong token.
    pub fn failed(&self, ip: Option<IpAddr>, now: Instant) {
        let Ok(mut map) = self.map.lock() else {
            return;
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
        if now.saturating_duration_since(c.since) >= WINDOW {
            *c = Count {
                failures: 0,
                since: now,
            };
        }
        c.failures = c.failures.saturating_add(1);
    }

    /// The address logged in: its count is forgotten.
    pub fn succeeded(&self, ip: Option<IpAddr>) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(&client(ip));
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
            assert!(t.check(a, t0).is_ok(), "try {i}");
            t.failed(a, t0 + Duration::from_secs(u64::from(i)));
        }
        let wait = t
            .check(a, t0 + Duration::from_secs(10))
            .expect_err("throttled");
        assert_eq!(wait, WINDOW - Duration::from_secs(10));
        assert!(t.check(ip("192.0.2.8"), t0).is_ok(), "another address");
        assert!(t.check(a, t0 + WINDOW).is_ok(), "the window ended");
        t.failed(a, t0 + WINDOW);
        assert!(t.check(a, t0 + WINDOW).is_ok(), "a new window, one failure");
        t.succeeded(a);
        assert!(t.map.lock().expect("lock").get(&client(a)).is_none());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..MAX_FAILURES {
            t.failed(ip(&format!("2001:db8::{i}")), t0);
        }
        assert!(t.check(ip("2001:db8::ffff"), t0).is_err(), "same /64");
        assert!(t.check(ip("2001:db8:0:1::1"), t0).is_ok(), "another /64");
        for _ in 0..MAX_FAILURES {
            t.failed(ip("::ffff:192.0.2.9"), t0);
        }
        assert!(t.check(ip("192.0.2.9"), t0).is_err());
    }

    #[test]
    fn the_table_is_bounded_and_overflow_is_throttled_together() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..MAX_CLIENTS as u32 {
            t.failed(Some(IpAddr::from(i.to_be_bytes())), t0);
        }
        for i in 0..MAX_FAILURES {
            let fresh = Some(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()));
            t.failed(fresh, t0);
        }
        assert_eq!(t.map.lock().expect("lock").len(), MAX_CLIENTS + 1);
        let new = Some(IpAddr::from(0x0b00_0000u32.to_be_bytes()));
        assert!(
            t.check(new, t0).is_err(),
            "new addresses share the overflow count"
        );
        assert!(t.check(new, t0 + WINDOW).is_ok());
        t.failed(new, t0 + WINDOW);
        assert_eq!(t.map.lock().expect("lock").len(), 1, "stale entries purged");
    }
}
