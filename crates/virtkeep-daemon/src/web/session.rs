//! Browser sessions of the web console: a random id in an HttpOnly cookie stands for
//! the scope of the token that logged in; the token itself is never stored, neither in
//! the cookie nor here. Sessions live in memory: a daemon restart logs everyone out.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::scope::Scope;

/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// At most this many sessions at once: a login beyond it drops the oldest session, so
/// that a flood of logins cannot grow the daemon's memory.
pub const MAX_SESSIONS: usize = 1024;

/// What a session may do, and the token its forms must carry.
#[derive(Debug, Clone)]
pub struct Session {
    pub scope: Scope,
    /// The per-session CSRF token, sent back in every form's hidden `csrf` field.
    pub csrf: String,
    created: Instant,
}

impl Session {
    /// Whether `given` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, given: &str) -> bool {
        !given.is_empty() && bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

/// 32 random bytes from the kernel, hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    let mut buf = [0u8; 32];
    // /dev/urandom never blocks after boot and never fails on a working Linux; a failure
    // here must not yield a guessable token, so it is fatal.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom for a session token");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// A new session of `scope`: its id (the cookie's value).
    pub fn create(&self, scope: Scope) -> String {
        self.create_at(scope, Instant::now())
    }

    fn create_at(&self, scope: Scope, now: Instant) -> String {
        let id = random_token();
        let Ok(mut map) = self.map.lock() else {
            return id;
        };
        map.retain(|_, s| now.duration_since(s.created) < SESSION_TTL);
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            id.clone(),
            Session {
                scope,
                csrf: random_token(),
                created: now,
            },
        );
        id
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        let map = self.map.lock().ok()?;
        map.get(id)
            .filter(|s| now.duration_since(s.created) < SESSION_TTL)
            .cloned()
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }
}

/// The value of cookie `name` in a `Cookie:` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_are_bounded() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let id = s.create_at(Scope::Operate, t0);
        assert_eq!(id.len(), 64);
        let got = s.get_at(&id, t0).expect("live");
        assert_eq!(got.scope, Scope::Operate);
        assert!(got.csrf_ok(&got.csrf.clone()));
        assert!(!got.csrf_ok(""));
        assert!(!got.csrf_ok(&random_token()));
        assert!(s.get_at(&id, t0 + SESSION_TTL).is_none(), "expired");
        assert!(s.get_at("nope", t0).is_none());
        for i in 0..MAX_SESSIONS + 5 {
            s.create_at(Scope::Read, t0 + Duration::from_secs(i as u64 + 1));
        }
        assert_eq!(s.map.lock().expect("lock").len(), MAX_SESSIONS);
        assert!(s.get_at(&id, t0).is_none(), "the oldest went first");
        s.remove(&id);
    }

    #[test]
    fn cookie_header_parsing() {
        let h = "a=1; vk_session=abc ; other=x=y";
        assert_eq!(cookie(h, "vk_session"), Some("abc"));
        assert_eq!(cookie(h, "other"), Some("x=y"));
        assert_eq!(cookie(h, "vk"), None);
    }
}
